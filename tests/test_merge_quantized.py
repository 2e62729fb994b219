"""HDRQ merge of quantized experts (Eq. 11/12) against direct elementwise computations and brute force."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from hdrq_lightning.errors import ArtifactError
from hdrq_lightning.merge import dequantize_state, get_merge_method

QMIN, QMAX = -8, 7


def _expert(
    integers: Tensor, scale: Tensor, zero_point: Tensor, offset: float, layer: str = "conv"
) -> dict[str, Tensor]:
    """An integer-format expert with one quantized layer, an activation quantizer and a float head."""
    return {
        f"{layer}.weight_int": integers.to(torch.int8),
        f"{layer}.weight_scale": scale.float(),
        f"{layer}.weight_zero_point": zero_point.float(),
        f"{layer}.weight_qmin": torch.tensor(QMIN, dtype=torch.int32),
        f"{layer}.weight_qmax": torch.tensor(QMAX, dtype=torch.int32),
        f"{layer}.bias": torch.tensor([offset, -offset, 2 * offset]),
        "act.scale": torch.tensor(0.1 + offset),
        "act.zero_point": torch.tensor(0.0),
        "act.qmin": torch.tensor(0, dtype=torch.int32),
        "act.qmax": torch.tensor(15, dtype=torch.int32),
        "head.weight": torch.full((2, 3), offset),
    }


def _random_integers(seed: int, shape: tuple[int, ...] = (3, 2, 4)) -> Tensor:
    return torch.randint(QMIN, QMAX + 1, shape, generator=torch.Generator().manual_seed(seed))


def _equal_step_experts(layers: tuple[str, ...] = ("conv",)) -> list[dict[str, Tensor]]:
    """Two experts with equal per-channel steps and zero points: odd integer sums are ambiguous."""
    scale = torch.tensor([0.1, 0.25, 0.05]).view(3, 1, 1)
    zero_point = torch.zeros(3, 1, 1)
    experts = []
    for index in range(2):
        state: dict[str, Tensor] = {}
        for position, layer in enumerate(layers):
            state.update(
                _expert(_random_integers(10 * position + index), scale, zero_point, 0.1 * index, layer)
            )
        experts.append(state)
    return experts


def _direct_merge(
    experts: list[dict[str, Tensor]], weights: list[float], noise: list[Tensor] | None = None
) -> Tensor:
    """Eq. 11 / Eq. 12 element by element in Python floats (round half to even, like torch.round)."""
    integers = experts[0]["conv.weight_int"]
    merged = torch.empty_like(integers)
    for index in range(integers.numel()):
        position = list(torch.unravel_index(torch.tensor(index), integers.shape))
        channel = int(position[0])
        steps = [float(expert["conv.weight_scale"].view(-1)[channel]) for expert in experts]
        zeros = [float(expert["conv.weight_zero_point"].view(-1)[channel]) for expert in experts]
        values = [
            (int(expert["conv.weight_int"].view(-1)[index]) - zeros[k]) * steps[k]
            for k, expert in enumerate(experts)
        ]
        if noise is not None:
            values = [value + float(noise[k].view(-1)[index]) for k, value in enumerate(values)]
        step = float(torch.tensor(sum(w * s for w, s in zip(weights, steps)), dtype=torch.float32))
        zero = round(sum(w * z for w, z in zip(weights, zeros)))
        value = sum(w * v for w, v in zip(weights, values)) / step
        merged.view(-1)[index] = min(max(round(value) + zero, QMIN), QMAX)
    return merged


def _asymmetric_experts() -> list[dict[str, Tensor]]:
    scales = [torch.tensor([0.11, 0.2, 0.07]).view(3, 1, 1), torch.tensor([0.13, 0.17, 0.05]).view(3, 1, 1)]
    zero_points = [torch.tensor([1.0, -2.0, 0.0]).view(3, 1, 1), torch.tensor([2.0, -1.0, 3.0]).view(3, 1, 1)]
    return [
        _expert(_random_integers(index), scales[index], zero_points[index], 0.2 * index) for index in range(2)
    ]


def test_eq11_matches_direct_elementwise_computation() -> None:
    experts = _asymmetric_experts()
    weights = [0.3, 0.7]
    merged = get_merge_method("quantized", sampling="none").merge(experts, weights=weights)
    assert torch.equal(merged["conv.weight_int"], _direct_merge(experts, weights))
    expected_scale = 0.3 * experts[0]["conv.weight_scale"] + 0.7 * experts[1]["conv.weight_scale"]
    torch.testing.assert_close(merged["conv.weight_scale"], expected_scale)
    torch.testing.assert_close(merged["conv.weight_zero_point"], torch.tensor([2.0, -1.0, 2.0]).view(3, 1, 1))
    torch.testing.assert_close(merged["act.scale"], torch.tensor(0.3 * 0.1 + 0.7 * 0.3))
    torch.testing.assert_close(merged["conv.bias"], torch.tensor([0.14, -0.14, 0.28]))
    torch.testing.assert_close(merged["head.weight"], torch.full((2, 3), 0.14))
    assert merged["conv.weight_qmax"].item() == QMAX and merged["act.qmax"].item() == 15


def test_eq11_uniform_symmetric_is_step_weighted_integer_average() -> None:
    experts = _asymmetric_experts()
    for expert in experts:
        expert["conv.weight_zero_point"] = torch.zeros(3, 1, 1)
    merged = get_merge_method("quantized", sampling="none").merge(experts)["conv.weight_int"]
    integers = [expert["conv.weight_int"].double() for expert in experts]
    steps = [expert["conv.weight_scale"].double() for expert in experts]
    paper = torch.round((integers[0] * steps[0] + integers[1] * steps[1]) / (steps[0] + steps[1]))
    assert torch.equal(merged, paper.to(torch.int8))


def test_merged_integers_lie_on_the_merged_grid() -> None:
    experts = _equal_step_experts()
    experts[0]["conv.weight_int"][0] = QMAX  # pushes some merged values to the upper bound
    for sample in get_merge_method("quantized", num_samples=20).sample_merges(experts):
        integers = sample["conv.weight_int"]
        assert integers.dtype == torch.int8
        assert int(integers.min()) >= QMIN and int(integers.max()) <= QMAX


def test_ambiguous_elements_are_resolved_by_sampling() -> None:
    experts = _equal_step_experts()
    integer_sum = experts[0]["conv.weight_int"].long() + experts[1]["conv.weight_int"].long()
    ambiguous = integer_sum % 2 == 1
    assert ambiguous.any() and (~ambiguous).any()
    samples = [s["conv.weight_int"].long() for s in get_merge_method("quantized").sample_merges(experts)]
    assert len(samples) == 100
    down, up = (
        torch.div(integer_sum - 1, 2, rounding_mode="floor"),
        torch.div(integer_sum + 1, 2, rounding_mode="floor"),
    )
    stacked = torch.stack(samples)
    # Non-ambiguous elements are the exact average in every sample.
    assert (stacked[:, ~ambiguous] == (integer_sum // 2)[~ambiguous]).all()
    # Ambiguous elements take one of the two neighbours, and each neighbour occurs across samples.
    assert ((stacked == down) | (stacked == up))[:, ambiguous].all()
    assert (stacked == down)[:, ambiguous].any(0).all() and (stacked == up)[:, ambiguous].any(0).all()
    # Without noise the tie is rounded half to even.
    plain = get_merge_method("quantized", sampling="none").merge(experts)["conv.weight_int"].long()
    half_to_even = torch.where(down % 2 == 0, down, up)
    assert torch.equal(plain, torch.where(ambiguous, half_to_even, integer_sum // 2))


def _layer_dequantized(state: dict[str, Tensor], layer: str) -> Tensor:
    return (
        (state[f"{layer}.weight_int"].double() - state[f"{layer}.weight_zero_point"].double())
        * state[f"{layer}.weight_scale"].double()
    ).flatten()


def _alignments(sample: dict[str, Tensor], experts: list[dict[str, Tensor]], layer: str) -> list[float]:
    """|cos(m - q_k, mid - q_k)| for each expert k, computed with torch's cosine similarity."""
    merged = _layer_dequantized(sample, layer)
    values = [_layer_dequantized(expert, layer) for expert in experts]
    midpoint = sum(values) / len(values)
    return [
        abs(float(torch.nn.functional.cosine_similarity(merged - value, midpoint - value, dim=0)))
        for value in values
    ]


@pytest.mark.parametrize("selection", ["cosine", "cosine_sequential", "none"])
def test_selection_matches_a_search_over_all_samples(selection: str) -> None:
    layers = ("conv", "fc")
    experts = _equal_step_experts(layers)
    method = get_merge_method("quantized", num_samples=30, selection=selection, seed=7)
    samples = list(method.sample_merges(experts))
    merged = method.merge(experts)
    for layer in layers:
        scores = [_alignments(sample, experts, layer) for sample in samples]
        if selection == "cosine":
            chosen = max(range(len(samples)), key=lambda index: sum(scores[index]))
        elif selection == "cosine_sequential":
            chosen = 0
            for index in range(1, len(samples)):
                if all(new > old for new, old in zip(scores[index], scores[chosen])):
                    chosen = index
        else:
            chosen = 0
        assert torch.equal(merged[f"{layer}.weight_int"], samples[chosen][f"{layer}.weight_int"])
    distinct = {tuple(sample["conv.weight_int"].flatten().tolist()) for sample in samples}
    assert len(distinct) > 1  # the search was over genuinely different samples


def test_three_experts_with_equal_steps_have_no_ambiguity() -> None:
    scale, zero_point = torch.full((3, 1, 1), 0.1), torch.zeros(3, 1, 1)
    experts = [_expert(_random_integers(index), scale, zero_point, 0.0) for index in range(3)]
    samples = list(get_merge_method("quantized", num_samples=10).sample_merges(experts))
    integer_sum = sum(expert["conv.weight_int"].long() for expert in experts)
    nearest = torch.round(integer_sum / 3.0)  # thirds are never half-integers
    for sample in samples:
        assert torch.equal(sample["conv.weight_int"].long(), nearest.long())


def test_merge_is_deterministic_given_the_seed() -> None:
    experts = _equal_step_experts()
    first = get_merge_method("quantized", selection="none", seed=1).merge(experts)["conv.weight_int"]
    again = get_merge_method("quantized", selection="none", seed=1).merge(experts)["conv.weight_int"]
    assert torch.equal(first, again)
    others = [
        get_merge_method("quantized", selection="none", seed=seed).merge(experts)["conv.weight_int"]
        for seed in range(2, 6)
    ]
    assert any(not torch.equal(first, other) for other in others)


def test_merging_identical_experts_is_the_identity() -> None:
    expert = _asymmetric_experts()[0]
    merged = get_merge_method("quantized").merge([expert, expert])
    for key, tensor in expert.items():
        assert torch.equal(merged[key], tensor), key


def test_disagreeing_bit_widths_and_missing_fields_are_rejected() -> None:
    experts = _asymmetric_experts()
    experts[1]["conv.weight_qmax"] = torch.tensor(127, dtype=torch.int32)
    with pytest.raises(ArtifactError, match="conv.weight_qmax"):
        get_merge_method("quantized").merge(experts)
    broken = [
        {key: value for key, value in expert.items() if key != "conv.weight_zero_point"}
        for expert in _asymmetric_experts()
    ]
    with pytest.raises(ArtifactError, match="conv.weight_zero_point"):
        get_merge_method("quantized").merge(broken)


def test_dequantize_state_maps_integers_to_float_weights() -> None:
    state = _asymmetric_experts()[1]
    dense = dequantize_state(state)
    integers, scale, zero = (
        state["conv.weight_int"],
        state["conv.weight_scale"],
        state["conv.weight_zero_point"],
    )
    for channel in range(3):
        for index in range(8):
            expected = (int(integers[channel].flatten()[index]) - float(zero[channel])) * float(
                scale[channel]
            )
            assert math.isclose(float(dense["conv.weight"][channel].flatten()[index]), expected, rel_tol=1e-6)
    assert set(dense) == {"conv.weight", "conv.bias", "head.weight"}
    assert "act.scale" in dequantize_state(state, keep_activation_quantizers=True)


def test_ambiguity_follows_the_integer_sum_not_the_steps():
    """Official-code rule: two experts are ambiguous exactly where I_1 + I_2 is odd, even with unequal steps."""
    first = torch.tensor([1, 1, 2, -3]).view(4, 1)
    second = torch.tensor([2, 3, 2, 0]).view(4, 1)  # sums 3 (odd), 4, 4, -3 (odd)
    experts = [
        _expert(first, torch.full((4, 1), 0.10), torch.zeros(4, 1), 0.0),
        _expert(second, torch.full((4, 1), 0.11), torch.zeros(4, 1), 0.1),
    ]
    method = get_merge_method("quantized", sampling="noise", num_samples=64, selection="none")
    samples = torch.stack([s["conv.weight_int"].flatten() for s in method.sample_merges(experts)])
    changes = (samples != samples[0]).any(0)
    assert changes.tolist() == [True, False, False, True]
    # the unambiguous elements are Eq. 11 exactly: round((I1 D1 + I2 D2) / (D1 + D2))
    assert samples[0, 1].item() == round((1 * 0.10 + 3 * 0.11) / 0.21)
    assert samples[0, 2].item() == 2
