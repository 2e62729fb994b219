"""2-D loss surfaces around a model along filter-normalised random directions (HDRQ paper Fig. 2).

Filter normalisation (Li et al., 2018) rescales each filter of a random direction to the norm of the matching
weight filter, so surfaces of models with different weight scales (e.g. after BN folding) are comparable and
flatness reads the same across methods.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from torch import Tensor

from hdrq_lightning.errors import ArtifactError, ConfigError


def _check_known_keys(keys: Collection[str] | None, state: Mapping[str, Tensor]) -> None:
    if keys is None:
        return
    unknown = sorted(set(keys) - set(state))
    if unknown:
        raise ConfigError(
            f"Keys {unknown[:5]} are not in the state dict; pass keys from model.state_dict().keys()."
        )


def _is_filter_weight(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2


def filter_normalized_direction(
    state: Mapping[str, Tensor], generator: torch.Generator, keys: Collection[str] | None = None
) -> dict[str, Tensor]:
    """Draw a Gaussian direction whose every filter (slice along dim 0) has the norm of the weight's filter.

    Tensors of dim < 2 (biases, BN parameters), non-float buffers and keys outside ``keys`` (when given)
    get a zero direction. The draw is reproducible through ``generator``.
    """
    _check_known_keys(keys, state)
    if all(not _is_filter_weight(state[key]) for key in (state if keys is None else keys)):
        raise ConfigError(
            "No floating weight of dim >= 2 was selected, so the direction is zero; pass keys that include "
            "conv/linear weights."
        )
    direction: dict[str, Tensor] = {}
    for key, weight in state.items():
        if not (_is_filter_weight(weight) and (keys is None or key in keys)):
            direction[key] = torch.zeros_like(weight)
            continue
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        noise = torch.randn(weight.shape, generator=generator, device=generator.device, dtype=compute_dtype)
        noise_filters = noise.to(weight.device).flatten(1)
        weight_filters = weight.detach().to(compute_dtype).flatten(1)
        scale = weight_filters.norm(dim=1, keepdim=True) / noise_filters.norm(dim=1, keepdim=True).clamp_min(
            1e-12
        )
        direction[key] = (noise_filters * scale).reshape(weight.shape).to(weight.dtype)
    return direction


def _perturbable_keys(center: Mapping[str, Tensor], keys: Collection[str] | None) -> list[str]:
    _check_known_keys(keys, center)
    return [
        key for key, tensor in center.items() if tensor.is_floating_point() and (keys is None or key in keys)
    ]


def _check_direction(
    name: str, direction: Mapping[str, Tensor], center: Mapping[str, Tensor], keys: list[str]
) -> None:
    for key in keys:
        if key not in direction or direction[key].shape != center[key].shape:
            raise ArtifactError(
                f"{name} lacks '{key}' or has a different shape than the center; draw it with "
                "filter_normalized_direction(center, ...)."
            )


def loss_surface(
    evaluate_state: Callable[[Mapping[str, Tensor]], float],
    center: Mapping[str, Tensor],
    dir_x: Mapping[str, Tensor],
    dir_y: Mapping[str, Tensor],
    span: float = 1.0,
    steps: int = 11,
    keys: Collection[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss at center + a * dir_x + b * dir_y on a steps x steps grid of a, b in [-span, span].

    Returns ``(alphas, betas, losses)`` with ``losses[i, j]`` the loss at ``(alphas[i], betas[j])``.
    Only floating tensors (restricted to ``keys`` when given) move; the rest are taken from the center.
    ``steps`` is odd so the center itself lies on the grid.
    """
    if span <= 0:
        raise ConfigError(f"span must be positive, got {span}; use e.g. span=1.0.")
    if steps < 3 or steps % 2 == 0:
        raise ConfigError(f"steps must be an odd integer >= 3 so the center lies on the grid, got {steps}.")
    moving = _perturbable_keys(center, keys)
    _check_direction("dir_x", dir_x, center, moving)
    _check_direction("dir_y", dir_y, center, moving)

    # Symmetric integer grid, so the middle coefficient is exactly zero.
    coefficients = span * (2 * torch.arange(steps, dtype=torch.float64) - (steps - 1)) / (steps - 1)
    losses = torch.empty(steps, steps, dtype=torch.float64)
    for i, alpha in enumerate(coefficients.tolist()):
        for j, beta in enumerate(coefficients.tolist()):
            state = dict(center)
            for key in moving:
                base = center[key]
                state[key] = base + alpha * dir_x[key].to(base) + beta * dir_y[key].to(base)
            losses[i, j] = float(evaluate_state(state))
    return coefficients, coefficients.clone(), losses
