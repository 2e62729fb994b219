"""Error barrier along the linear path between two models (HDRQ paper Eq. 1-3).

The barrier max_lambda [L(theta_lambda) - (L(theta_1) + L(theta_2)) / 2] measures how much the loss rises
when two endpoints are merged by interpolation; a low barrier means the endpoints merge well. The functions
here only drive the evaluation: the caller decides what the model at coefficient lambda is (FP interpolation
for Eq. 2, or the interpolated model re-quantized on the interpolated grid for Eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from hdrq_lightning.errors import ArtifactError, ConfigError

Evaluation = tuple[float, float | None]
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(step / 10 for step in range(11))
_ENDPOINT_TOLERANCE = 1e-9


@dataclass
class BarrierCurve:
    """Loss (and accuracy) along the interpolation path and the resulting error barrier."""

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float] | None
    barrier: float

    def to_dict(self) -> dict:
        """Plain-Python form, ready for JSON or a logger."""
        return asdict(self)


def interpolate_states(
    state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], lam: float
) -> dict[str, Tensor]:
    """Return (1 - lam) * a + lam * b for floating tensors (Eq. 1); non-floating tensors come from a.

    Endpoints are reproduced exactly (lam = 0 gives a, lam = 1 gives b), so the barrier of a pair of
    identical models is exactly zero. Integer buffers (e.g. BN's num_batches_tracked) cannot be averaged
    and are taken from ``state_a``.
    """
    if set(state_a) != set(state_b):
        only_a = sorted(set(state_a) - set(state_b))[:5]
        only_b = sorted(set(state_b) - set(state_a))[:5]
        raise ArtifactError(
            f"Cannot interpolate state dicts with different keys (only in a: {only_a}, only in b: {only_b}); "
            "pass two state dicts of the same architecture."
        )
    interpolated: dict[str, Tensor] = {}
    for key, tensor_a in state_a.items():
        tensor_b = state_b[key]
        if tensor_a.shape != tensor_b.shape:
            raise ArtifactError(
                f"Cannot interpolate '{key}': shapes {tuple(tensor_a.shape)} and {tuple(tensor_b.shape)} differ; "
                "pass two state dicts of the same architecture."
            )
        if tensor_a.is_floating_point() != tensor_b.is_floating_point():
            raise ArtifactError(
                f"Cannot interpolate '{key}': dtypes {tensor_a.dtype} and {tensor_b.dtype} are not both floating; "
                "pass two state dicts saved by the same model class."
            )
        if tensor_a.is_floating_point():
            interpolated[key] = torch.lerp(tensor_a, tensor_b.to(tensor_a), lam)
        else:
            interpolated[key] = tensor_a.clone()
    return interpolated


def _endpoint_index(lambdas: Sequence[float], endpoint: float) -> int:
    for index, lam in enumerate(lambdas):
        if abs(lam - endpoint) <= _ENDPOINT_TOLERANCE:
            return index
    raise ConfigError(
        f"The lambda grid {list(lambdas)} lacks the endpoint {endpoint:g}; the barrier is measured against the "
        "endpoints' mean loss, so include both 0 and 1."
    )


def error_barrier(
    evaluate: Callable[[float], Evaluation], lambdas: Sequence[float] = DEFAULT_LAMBDAS
) -> BarrierCurve:
    """Evaluate the model at each interpolation coefficient and compute the error barrier (Eq. 2 / Eq. 3).

    ``evaluate(lam)`` returns ``(loss, accuracy or None)`` of the model at coefficient ``lam``.
    """
    grid = sorted(float(lam) for lam in lambdas)
    if any(not 0.0 <= lam <= 1.0 for lam in grid):
        raise ConfigError(
            f"Interpolation coefficients must lie in [0, 1] (Eq. 2), got {grid}; drop the values outside."
        )
    start, end = _endpoint_index(grid, 0.0), _endpoint_index(grid, 1.0)

    losses: list[float] = []
    accuracies: list[float | None] = []
    for lam in grid:
        loss, accuracy = evaluate(lam)
        losses.append(float(loss))
        accuracies.append(None if accuracy is None else float(accuracy))

    reported = [accuracy for accuracy in accuracies if accuracy is not None]
    if reported and len(reported) != len(accuracies):
        raise ConfigError(
            "evaluate returned an accuracy for some lambdas and None for others; return one for all or none."
        )
    endpoint_mean = (losses[start] + losses[end]) / 2
    return BarrierCurve(
        lambdas=grid,
        losses=losses,
        accuracies=reported if reported else None,
        barrier=max(loss - endpoint_mean for loss in losses),
    )


def state_evaluator(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Evaluation],
    state_at: Callable[[float], Mapping[str, Tensor]],
) -> Callable[[float], Evaluation]:
    """Build an ``evaluate(lam)`` for :func:`error_barrier` that loads ``state_at(lam)`` into ``model``.

    The state is loaded strictly and ``loss_fn(model)`` gives the result; nothing is restored afterwards,
    so the model holds the last evaluated state.
    """

    def evaluate(lam: float) -> Evaluation:
        try:
            model.load_state_dict(state_at(lam), strict=True)
        except RuntimeError as error:
            details = " ".join(str(error).split())[:300]
            raise ArtifactError(
                f"The state at lambda={lam:g} does not fit the model ({details}); "
                "build the model with the same architecture and quantizers as the interpolated states."
            ) from error
        return loss_fn(model)

    return evaluate
