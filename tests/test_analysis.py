"""Error barrier, loss surface and plots, each checked against an independent computation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdrq_lightning.analysis import (
    BarrierCurve,
    error_barrier,
    filter_normalized_direction,
    interpolate_states,
    loss_surface,
    plot_barrier_curves,
    plot_loss_surface,
    plot_method_comparison,
    plot_sample_distribution,
    state_evaluator,
)
from hdrq_lightning.errors import ArtifactError, ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _cross_entropy_on_fixed_data() -> Callable[[nn.Module], tuple[float, float]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 4, generator=generator)
    targets = torch.randint(0, 3, (32,), generator=generator)

    @torch.no_grad()
    def loss_fn(model: nn.Module) -> tuple[float, float]:
        logits = model(inputs)
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        return F.cross_entropy(logits, targets).item(), accuracy

    return loss_fn


# ----------------------------------------------------------------------------------------------- barrier


def test_barrier_of_identical_models_is_zero() -> None:
    model = _tiny_mlp(seed=1)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    twin = {key: value.clone() for key, value in model.state_dict().items()}
    loss_fn = _cross_entropy_on_fixed_data()
    evaluate = state_evaluator(model, loss_fn, lambda lam: interpolate_states(state, twin, lam))

    curve = error_barrier(evaluate)

    assert curve.barrier == pytest.approx(0.0, abs=1e-7)
    assert len(curve.lambdas) == 11 and curve.lambdas[0] == 0.0 and curve.lambdas[-1] == 1.0
    assert curve.accuracies is not None and len(set(curve.accuracies)) == 1
    assert max(curve.losses) - min(curve.losses) == pytest.approx(0.0, abs=1e-7)


def test_barrier_of_different_models_is_positive_and_serialisable() -> None:
    model = _tiny_mlp(seed=1)
    state_a = {key: value.clone() for key, value in model.state_dict().items()}
    state_b = {key: value.clone() for key, value in _tiny_mlp(seed=2).state_dict().items()}
    curve = error_barrier(
        state_evaluator(
            model, _cross_entropy_on_fixed_data(), lambda lam: interpolate_states(state_a, state_b, lam)
        )
    )
    # Lower bound of Sec. 3.3: the larger endpoint alone already lies |L1 - L2| / 2 above the mean.
    assert curve.barrier >= abs(curve.losses[0] - curve.losses[-1]) / 2 - 1e-9
    assert curve.to_dict()["barrier"] == curve.barrier


def _quadratic(theta: Tensor, center: Tensor, sign: float, offset: float) -> float:
    return offset + sign * float(((theta - center) ** 2).sum())


def test_barrier_of_convex_quadratic_matches_hand_computation() -> None:
    # L(theta) = ||theta - c||^2, a = (0, 0), b = (1, 1), c = (2, 0):
    # L(lam) = (lam - 2)^2 + lam^2, L(0) = 4, L(1) = 2, mean 3, convex => max at lam = 0: barrier 1.
    a, b, c = (
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        torch.tensor([2.0, 0.0], dtype=torch.float64),
    )
    curve = error_barrier(
        lambda lam: (_quadratic(interpolate_states({"t": a}, {"t": b}, lam)["t"], c, 1.0, 0.0), None)
    )
    hand = [(lam - 2) ** 2 + lam**2 for lam in curve.lambdas]
    assert curve.losses == pytest.approx(hand)
    assert curve.barrier == pytest.approx(1.0)
    assert curve.accuracies is None


def test_barrier_of_concave_bump_matches_hand_computation_on_coarse_grid() -> None:
    # L(theta) = 5 - ||theta - c||^2 with a = (0, 0), b = (2, 0), c = (1, 0): L(lam) = 5 - (2 lam - 1)^2,
    # endpoints 4 and 4. On the grid {0, 0.3, 0.6, 1}: 4, 4.84, 4.96, 4 -> barrier 0.96 (true max 1 is off-grid).
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([0.0, 0.0], [2.0, 0.0], [1.0, 0.0]))
    curve = error_barrier(
        lambda lam: (_quadratic(interpolate_states({"t": a}, {"t": b}, lam)["t"], c, -1.0, 5.0), None),
        lambdas=[1.0, 0.6, 0.3, 0.0],
    )
    assert curve.lambdas == [0.0, 0.3, 0.6, 1.0]
    assert curve.losses == pytest.approx([4.0, 4.84, 4.96, 4.0])
    assert curve.barrier == pytest.approx(0.96)


@pytest.mark.parametrize("lambdas", [[0.0, 0.5], [0.5, 1.0], [0.0, 0.5, 1.0, 1.5]])
def test_barrier_grid_must_span_the_endpoints(lambdas: list[float]) -> None:
    with pytest.raises(ConfigError):
        error_barrier(lambda lam: (0.0, None), lambdas=lambdas)


def test_barrier_rejects_partial_accuracies() -> None:
    with pytest.raises(ConfigError):
        error_barrier(lambda lam: (0.0, None if lam > 0.5 else 1.0))


def test_interpolate_states_endpoints_midpoint_and_integer_buffers() -> None:
    state_a = {"weight": torch.randn(3, 2), "count": torch.tensor(5)}
    state_b = {"weight": torch.randn(3, 2), "count": torch.tensor(9)}

    assert torch.equal(interpolate_states(state_a, state_b, 0.0)["weight"], state_a["weight"])
    assert torch.equal(interpolate_states(state_a, state_b, 1.0)["weight"], state_b["weight"])
    middle = interpolate_states(state_a, state_b, 0.5)
    flat_a, flat_b = state_a["weight"].flatten().tolist(), state_b["weight"].flatten().tolist()
    expected = [(x + y) / 2 for x, y in zip(flat_a, flat_b)]
    assert middle["weight"].flatten().tolist() == pytest.approx(expected, rel=1e-6)
    for lam in (0.0, 0.5, 1.0):
        count = interpolate_states(state_a, state_b, lam)["count"]
        assert count.dtype == torch.int64 and count.item() == 5


@pytest.mark.parametrize(
    "state_b",
    [
        {"weight": torch.zeros(3, 2)},
        {"weight": torch.zeros(2, 3), "count": torch.tensor(1)},
        {"weight": torch.zeros(3, 2), "other": torch.tensor(1)},
    ],
)
def test_interpolate_states_rejects_mismatched_states(state_b: dict[str, Tensor]) -> None:
    with pytest.raises(ArtifactError):
        interpolate_states({"weight": torch.zeros(3, 2), "count": torch.tensor(1)}, state_b, 0.5)


def test_state_evaluator_loads_the_state_and_matches_functional_forward() -> None:
    model = nn.Linear(3, 2)
    inputs = torch.randn(4, 3)
    state_a = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    state_b = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    evaluate = state_evaluator(
        model,
        lambda m: (float(m(inputs).sum().detach()), None),
        lambda lam: interpolate_states(state_a, state_b, lam),
    )
    lam = 0.25
    weight = 0.75 * state_a["weight"] + 0.25 * state_b["weight"]
    bias = 0.75 * state_a["bias"] + 0.25 * state_b["bias"]
    expected = float((inputs @ weight.T + bias).sum())
    assert evaluate(lam)[0] == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(model.weight.detach(), weight)

    broken = state_evaluator(model, lambda m: (0.0, None), lambda lam: {"weight": torch.zeros(2, 3)})
    with pytest.raises(ArtifactError):
        broken(0.0)


# ----------------------------------------------------------------------------------------------- surface


def _toy_state() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
        "bn.weight": torch.rand(4, generator=generator) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(5, 4, generator=generator) * 3.0,
    }


def test_filter_normalized_direction_matches_filter_norms() -> None:
    state = _toy_state()
    direction = filter_normalized_direction(state, torch.Generator().manual_seed(0))

    for key in ("conv.weight", "fc.weight"):
        assert direction[key].shape == state[key].shape
        for index in range(state[key].shape[0]):
            weight_norm = math.sqrt(sum(v * v for v in state[key][index].flatten().tolist()))
            direction_norm = math.sqrt(sum(v * v for v in direction[key][index].flatten().tolist()))
            assert direction_norm == pytest.approx(weight_norm, rel=1e-5)
        assert not torch.allclose(direction[key], state[key])  # random, not the weight itself
    for key in ("conv.bias", "bn.weight"):
        assert torch.count_nonzero(direction[key]) == 0
    assert (
        direction["bn.num_batches_tracked"].dtype == torch.int64
        and direction["bn.num_batches_tracked"].item() == 0
    )

    again = filter_normalized_direction(state, torch.Generator().manual_seed(0))
    assert all(torch.equal(direction[key], again[key]) for key in state)


def test_filter_normalized_direction_respects_keys() -> None:
    state = _toy_state()
    direction = filter_normalized_direction(state, torch.Generator().manual_seed(0), keys={"fc.weight"})
    assert torch.count_nonzero(direction["conv.weight"]) == 0
    assert torch.count_nonzero(direction["fc.weight"]) == direction["fc.weight"].numel()
    with pytest.raises(ConfigError):
        filter_normalized_direction(state, torch.Generator(), keys={"missing.weight"})
    with pytest.raises(ConfigError):
        filter_normalized_direction(state, torch.Generator(), keys={"conv.bias"})


def test_loss_surface_of_quadratic_matches_closed_form() -> None:
    generator = torch.Generator().manual_seed(5)
    center = {"w": torch.randn(3, 2, generator=generator, dtype=torch.float64), "n": torch.tensor(2)}
    target = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    dir_x = {"w": torch.randn(3, 2, generator=generator, dtype=torch.float64), "n": torch.tensor(0)}
    dir_y = {"w": torch.randn(3, 2, generator=generator, dtype=torch.float64), "n": torch.tensor(0)}
    seen_counts: set[int] = set()

    def evaluate_state(state: dict[str, Tensor]) -> float:
        seen_counts.add(int(state["n"]))
        return float(((state["w"] - target) ** 2).sum())

    alphas, betas, losses = loss_surface(evaluate_state, center, dir_x, dir_y, span=0.5, steps=5)

    assert losses.shape == (5, 5)
    assert alphas.tolist() == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5]) and torch.equal(alphas, betas)
    assert losses[2, 2].item() == evaluate_state(center)
    assert seen_counts == {2}
    # ||r + a dx + b dy||^2 = |r|^2 + 2a r.dx + 2b r.dy + a^2 |dx|^2 + 2ab dx.dy + b^2 |dy|^2, with r = center - target.
    r, dx, dy = ((t.flatten().tolist()) for t in (center["w"] - target, dir_x["w"], dir_y["w"]))
    dot = lambda u, v: sum(p * q for p, q in zip(u, v))  # noqa: E731
    for i, a in enumerate(alphas.tolist()):
        for j, b in enumerate(betas.tolist()):
            closed = (
                dot(r, r)
                + 2 * a * dot(r, dx)
                + 2 * b * dot(r, dy)
                + a * a * dot(dx, dx)
                + 2 * a * b * dot(dx, dy)
                + b * b * dot(dy, dy)
            )
            assert losses[i, j].item() == pytest.approx(closed, rel=1e-10)


def test_loss_surface_of_mlp_center_equals_center_loss_and_keys_restrict() -> None:
    model = _tiny_mlp(seed=4)
    center = {key: value.clone() for key, value in model.state_dict().items()}
    loss_fn = _cross_entropy_on_fixed_data()
    keys = {"3.weight", "3.bias"}
    dir_x = filter_normalized_direction(center, torch.Generator().manual_seed(1))
    dir_y = filter_normalized_direction(center, torch.Generator().manual_seed(2))
    seen: list[dict[str, Tensor]] = []

    def evaluate_state(state: dict[str, Tensor]) -> float:
        seen.append(state)
        model.load_state_dict(state)
        return loss_fn(model)[0]

    _, _, losses = loss_surface(evaluate_state, center, dir_x, dir_y, steps=3, keys=keys)
    model.load_state_dict(center)
    assert losses[1, 1].item() == loss_fn(model)[0]
    for state in seen:
        assert all(torch.equal(state[key], center[key]) for key in center if key not in keys)
    assert not torch.equal(seen[0]["3.weight"], center["3.weight"])


@pytest.mark.parametrize("steps, span", [(4, 1.0), (1, 1.0), (5, 0.0)])
def test_loss_surface_rejects_bad_grid(steps: int, span: float) -> None:
    state = {"w": torch.ones(2, 2)}
    with pytest.raises(ConfigError):
        loss_surface(lambda s: 0.0, state, state, state, span=span, steps=steps)


def test_loss_surface_rejects_mismatched_direction() -> None:
    state = {"w": torch.ones(2, 2)}
    with pytest.raises(ArtifactError):
        loss_surface(lambda s: 0.0, state, {"w": torch.ones(3, 2)}, state, steps=3)


# ----------------------------------------------------------------------------------------------- plots


def _assert_single_png(path: Path, folder: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


def test_plot_barrier_curves_writes_png(tmp_path: Path) -> None:
    curves = {
        "QDrop": BarrierCurve([0.0, 0.5, 1.0], [1.0, 1.6, 1.1], [0.7, 0.5, 0.69], 0.55),
        "HDRQ": BarrierCurve([0.0, 0.5, 1.0], [1.0, 1.2, 1.1], [0.7, 0.65, 0.69], 0.15),
    }
    for metric in ("loss", "accuracy"):
        folder = tmp_path / metric
        _assert_single_png(plot_barrier_curves(curves, folder / "barrier.png", "R->C", metric=metric), folder)
    with pytest.raises(ConfigError):
        plot_barrier_curves(
            {"x": BarrierCurve([0.0, 1.0], [1.0, 1.0], None, 0.0)}, tmp_path / "b.png", metric="accuracy"
        )


def test_plot_loss_surface_writes_png(tmp_path: Path) -> None:
    coords = torch.linspace(-1, 1, 5)
    losses = coords[:, None] ** 2 + 2 * coords[None, :] ** 2
    path = plot_loss_surface(coords, coords, losses, tmp_path / "sub" / "surface.png", "HDRQ W4A8")
    _assert_single_png(path, tmp_path / "sub")
    flat = plot_loss_surface(coords, coords, torch.ones(5, 5), tmp_path / "flat" / "surface.png")
    _assert_single_png(flat, tmp_path / "flat")
    with pytest.raises(ConfigError):
        plot_loss_surface(coords, coords[:3], losses, tmp_path / "bad.png")


def test_plot_sample_distribution_writes_png(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    samples = {
        "random sample": (60 + torch.randn(30, generator=generator)).tolist(),
        "cosine selection": [61.5],
    }
    _assert_single_png(plot_sample_distribution(samples, tmp_path / "samples.png", "C->R, C->A"), tmp_path)


def test_plot_method_comparison_writes_png(tmp_path: Path) -> None:
    rows = [
        {"method": "FP", "bits": "32/32", "hmean": 67.78},
        {"method": "BRECQ", "bits": "W4A4", "hmean": 60.95},
        {"method": "QDrop", "bits": "W4A4", "hmean": 66.26},
        {"method": "HDRQ", "bits": "W4A4", "hmean": 66.41},
        {"method": "QDrop", "bits": "W3A3", "hmean": 62.99},
        {"method": "HDRQ", "bits": "W3A3", "hmean": 64.70},
    ]
    _assert_single_png(plot_method_comparison(rows, tmp_path / "methods.png", "R -> A,C,P"), tmp_path)
    with pytest.raises(ConfigError):
        plot_method_comparison(rows + [rows[1]], tmp_path / "dup.png")
    with pytest.raises(ConfigError):
        plot_method_comparison(rows, tmp_path / "methods.pdf")
