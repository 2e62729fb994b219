"""Mean, Task Arithmetic and TIES merges against hand-worked numbers and closed forms; registry errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.merge import MERGE_METHODS, MergeMethod, get_merge_method, merge_method

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
# Three task vectors of 5 elements; with density 0.4 each keeps its 2 largest magnitudes:
# expert 1 keeps {0: 0.5, 3: -0.8}, expert 2 keeps {0: -0.6, 3: -0.5}, expert 3 keeps {0: 0.95, 4: 0.9}.
TASK_VECTORS = [
    torch.tensor([0.5, -0.1, 0.3, -0.8, 0.0], dtype=torch.float64),
    torch.tensor([-0.6, 0.2, 0.4, -0.5, 0.05], dtype=torch.float64),
    torch.tensor([0.95, 0.7, -0.1, -0.2, 0.9], dtype=torch.float64),
]


def _experts_and_base() -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    base = {"w": BASE.clone(), "bn.num_batches_tracked": torch.tensor(5)}
    experts = [
        {"w": BASE + vector, "bn.num_batches_tracked": torch.tensor(5 + index)}
        for index, vector in enumerate(TASK_VECTORS)
    ]
    return experts, base


def test_task_arithmetic_matches_hand_worked_sum() -> None:
    experts, base = _experts_and_base()
    merged = get_merge_method("task_arithmetic", scaling=0.5).merge(experts, base=base)
    # summed task vector: [0.85, 0.8, 0.6, -1.5, 0.95]; halved and added to the base of ones.
    expected = torch.tensor([1.425, 1.4, 1.3, 0.25, 1.475], dtype=torch.float64)
    torch.testing.assert_close(merged["w"], expected)
    assert merged["bn.num_batches_tracked"].item() == 5 + 6 + 7


def test_task_arithmetic_with_weights_scales_each_vector() -> None:
    experts, base = _experts_and_base()
    merged = get_merge_method("task_arithmetic").merge(experts, base=base, weights=[1.0, 0.0, 2.0])
    # 1 * tau1 + 2 * tau3 = [2.4, 1.3, 0.1, -1.2, 1.8]
    expected = torch.tensor([3.4, 2.3, 1.1, -0.2, 2.8], dtype=torch.float64)
    torch.testing.assert_close(merged["w"], expected)


def test_ties_per_tensor_matches_hand_worked_example() -> None:
    experts, base = _experts_and_base()
    merged = get_merge_method("ties", density=0.4, scaling=1.0).merge(experts, base=base)
    # Trimmed sums: [0.85, 0, 0, -1.3, 0.9] -> signs [+, 0, 0, -, +].
    # Element 0 averages 0.5 and 0.95 (-0.6 disagrees); element 3 averages -0.8 and -0.5.
    expected = BASE + torch.tensor([0.725, 0.0, 0.0, -0.65, 0.9], dtype=torch.float64)
    torch.testing.assert_close(merged["w"], expected)
    assert merged["bn.num_batches_tracked"].item() == 18


def test_ties_weights_and_scaling() -> None:
    experts, base = _experts_and_base()
    merged = get_merge_method("ties", density=0.4, scaling=0.5).merge(
        experts, base=base, weights=[2.0, 1.0, 1.0]
    )
    # element 0: weighted 1.0, -0.6, 0.95 -> sign +, (1.0 + 0.95) / (2 + 1) = 0.65
    # element 3: weighted -1.6, -0.5 -> (-1.6 - 0.5) / 3 = -0.7; element 4: 0.9
    expected = BASE + 0.5 * torch.tensor([0.65, 0.0, 0.0, -0.7, 0.9], dtype=torch.float64)
    torch.testing.assert_close(merged["w"], expected)


def test_ties_global_scope_ranks_over_the_whole_model() -> None:
    base = {"a": BASE[:3].clone(), "b": BASE[3:].clone()}
    experts = [{"a": BASE[:3] + vector[:3], "b": BASE[3:] + vector[3:]} for vector in TASK_VECTORS]
    whole = get_merge_method("ties", density=0.4, scope="global").merge(experts, base=base)
    # Globally the same 2 of 5 entries survive as in the single-tensor example.
    torch.testing.assert_close(whole["a"], BASE[:3] + torch.tensor([0.725, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(whole["b"], BASE[3:] + torch.tensor([-0.65, 0.9], dtype=torch.float64))
    per_tensor = get_merge_method("ties", density=0.4, scope="per_tensor").merge(experts, base=base)
    # Per tensor, "a" keeps floor(1.2) = 1 entry per expert (element 0 each) and "b" keeps none.
    torch.testing.assert_close(
        per_tensor["a"], BASE[:3] + torch.tensor([0.725, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(per_tensor["b"], BASE[3:])


def test_mean_averages_floats_and_handles_integers() -> None:
    experts = [
        {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3, dtype=torch.int32)},
        {"w": torch.tensor([3.0, 6.0]), "step": torch.tensor(9, dtype=torch.int32)},
    ]
    merged = get_merge_method("mean").merge(experts, weights=[1.0, 3.0])
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, 5.0]))
    assert merged["step"].item() == 3 and merged["step"].dtype == torch.int32


def test_mean_merges_batch_norm_buffers_as_the_pooled_gaussian_mixture() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(40, 3, generator=generator) * 2 + 1, torch.randn(120, 3, generator=generator) - 3]
    batches = [2, 6]  # batches seen, proportional to the sample counts (20 per batch)
    experts = [
        {
            "bn.weight": torch.ones(3) * (index + 1),
            "bn.running_mean": data.mean(0),
            "bn.running_var": data.var(0, unbiased=False),
            "bn.num_batches_tracked": torch.tensor(count),
        }
        for index, (data, count) in enumerate(zip(samples, batches))
    ]
    merged = get_merge_method("mean").merge(experts)
    pooled = torch.cat(samples)
    torch.testing.assert_close(merged["bn.running_mean"], pooled.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["bn.running_var"], pooled.var(0, unbiased=False), atol=1e-5, rtol=1e-5)
    assert merged["bn.num_batches_tracked"].item() == 8
    torch.testing.assert_close(merged["bn.weight"], torch.full((3,), 1.5))  # affine part: plain average


def test_mean_batch_norm_falls_back_to_weights_without_batch_counts() -> None:
    experts = [
        {
            "bn.running_mean": torch.tensor([0.0]),
            "bn.running_var": torch.tensor([1.0]),
            "bn.num_batches_tracked": torch.tensor(0),
        },
        {
            "bn.running_mean": torch.tensor([4.0]),
            "bn.running_var": torch.tensor([2.0]),
            "bn.num_batches_tracked": torch.tensor(0),
        },
    ]
    merged = get_merge_method("mean").merge(experts, weights=[3.0, 1.0])
    # mixture 0.75 / 0.25: mu = 1, E[x^2] = 0.75 * 1 + 0.25 * (2 + 16) = 5.25, var = 4.25
    torch.testing.assert_close(merged["bn.running_mean"], torch.tensor([1.0]))
    torch.testing.assert_close(merged["bn.running_var"], torch.tensor([4.25]))


def test_registry_lists_the_built_in_methods() -> None:
    assert {"mean", "task_arithmetic", "ties", "quantized"} <= set(MERGE_METHODS)


def test_unknown_method_error_lists_registered_names() -> None:
    with pytest.raises(ConfigError, match="task_arithmetic"):
        get_merge_method("average_of_everything")


def test_unknown_parameter_error_lists_valid_parameters() -> None:
    with pytest.raises(ConfigError, match="density") as raised:
        get_merge_method("ties", sparsity=0.3)
    assert "sparsity" in str(raised.value)


def test_invalid_parameter_values_are_rejected() -> None:
    with pytest.raises(ConfigError, match="scope"):
        get_merge_method("ties", scope="layerwise")
    with pytest.raises(ConfigError, match="density"):
        get_merge_method("ties", density=0.0)


def test_task_vector_methods_require_a_base() -> None:
    experts, _ = _experts_and_base()
    for name in ("task_arithmetic", "ties"):
        with pytest.raises(ConfigError, match="base"):
            get_merge_method(name).merge(experts)


def test_mismatched_keys_and_shapes_name_the_key() -> None:
    with pytest.raises(ArtifactError, match="'layer.bias'"):
        get_merge_method("mean").merge(
            [{"w": torch.ones(2), "layer.bias": torch.ones(2)}, {"w": torch.ones(2)}]
        )
    with pytest.raises(ArtifactError, match="'w'"):
        get_merge_method("mean").merge([{"w": torch.ones(2)}, {"w": torch.ones(3)}])


def test_merge_method_decorator_registers_a_plug_in() -> None:
    @merge_method("test_first_expert")
    class FirstExpert(MergeMethod):
        @dataclass
        class Params:
            pass

        def merge(self, experts, base=None, weights=None):  # noqa: ANN001, ANN201
            return dict(experts[0])

    try:
        assert isinstance(get_merge_method("test_first_expert"), FirstExpert)
        with pytest.raises(ConfigError, match="twice"):
            merge_method("test_first_expert")(FirstExpert)
    finally:
        MERGE_METHODS.pop("test_first_expert")
