"""Merges of task vectors (expert minus base): Task Arithmetic (Ilharco et al.) and TIES (Yadav et al.).

Here ``weights`` scale each expert's task vector and are not normalised; by default every weight
is 1, so Task Arithmetic is exactly ``base + scaling * sum_k (expert_k - base)``. Integer buffers
are not task vectors: they follow :func:`merge_integer_tensor`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.merge.registry import (
    MergeMethod,
    StateDict,
    check_choice,
    check_matching_states,
    merge_integer_tensor,
    merge_method,
    resolve_weights,
)


def _checked_inputs(
    experts: Sequence[StateDict], base: StateDict | None, weights: Sequence[float] | None, method: str
) -> tuple[StateDict, list[float]]:
    """The base (required) and the per-expert task-vector weights (1 each by default)."""
    if base is None:
        raise ConfigError(
            f"Merge method '{method}' needs a base model; pass the pre-adaptation (source) state as base."
        )
    check_matching_states(
        [base, *experts], names=["base"] + [f"expert {index}" for index in range(len(experts))]
    )
    return base, resolve_weights(weights, len(experts), normalise=False, default=1.0)


def _task_vectors(experts: Sequence[StateDict], base: StateDict, key: str) -> Tensor:
    """The experts' differences to the base at ``key``, stacked along a new first axis, in float64."""
    return torch.stack([expert[key].double() - base[key].double() for expert in experts])


def _per_expert_view(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights shaped to broadcast against a stack of per-expert tensors ``like``."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view((-1,) + (1,) * (like.ndim - 1))


def keep_top_magnitudes(values: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``floor(density * numel)`` entries of ``values`` with the largest magnitude."""
    flat = values.flatten()
    count = math.floor(density * flat.numel() + 1e-9)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        mask[flat.abs().topk(count).indices] = True
    return mask.view(values.shape)


def disjoint_merge(trimmed: Tensor, weights: Sequence[float]) -> Tensor:
    """TIES sign election and disjoint mean over the expert axis (dim 0) of trimmed task vectors.

    The elected sign is that of the weighted sum; each element averages (weighted) only the
    nonzero entries that agree with it, and is 0 where none does.
    """
    weight = _per_expert_view(weights, trimmed)
    weighted = weight * trimmed
    elected = weighted.sum(0).sign()
    agrees = (trimmed.sign() == elected) & (trimmed != 0)
    numerator = (weighted * agrees).sum(0)
    denominator = (weight * agrees).sum(0)
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(torch.finfo(trimmed.dtype).tiny), 0.0
    )


@merge_method("task_arithmetic")
class TaskArithmeticMerge(MergeMethod):
    """base + scaling * sum_k weight_k * (expert_k - base) on floating tensors."""

    needs_base = True

    @dataclass
    class Params:
        """scaling: the lambda multiplying the summed task vectors."""

        scaling: float = 1.0

    def merge(
        self,
        experts: Sequence[StateDict],
        base: StateDict | None = None,
        weights: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        base, resolved = _checked_inputs(experts, base, weights, self.name)
        merged: dict[str, Tensor] = {}
        for key, base_tensor in base.items():
            if not base_tensor.is_floating_point():
                merged[key] = merge_integer_tensor(key, [expert[key] for expert in experts])
                continue
            vectors = _task_vectors(experts, base, key)
            summed = (_per_expert_view(resolved, vectors) * vectors).sum(0)
            merged[key] = (base_tensor.double() + self.params.scaling * summed).to(base_tensor.dtype)
        return merged


@merge_method("ties")
class TiesMerge(MergeMethod):
    """TIES: trim each task vector to its largest entries, elect signs, average the agreeing entries."""

    needs_base = True

    @dataclass
    class Params:
        """density: fraction of each task vector kept (by magnitude); scope: ranked over the whole
        model ("global") or within each tensor ("per_tensor"); scaling: lambda on the merged vector."""

        density: float = 0.2
        scope: str = "per_tensor"
        scaling: float = 1.0

        def __post_init__(self) -> None:
            if not 0.0 < self.density <= 1.0:
                raise ConfigError(f"TIES density={self.density} is invalid; use a fraction in (0, 1].")
            check_choice("scope", self.scope, ("global", "per_tensor"))

    def merge(
        self,
        experts: Sequence[StateDict],
        base: StateDict | None = None,
        weights: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        base, resolved = _checked_inputs(experts, base, weights, self.name)
        if any(weight <= 0 for weight in resolved):
            raise ConfigError(f"TIES weights {resolved} must all be positive (they weight a sign election).")
        float_keys = [key for key, tensor in base.items() if tensor.is_floating_point()]
        vectors = {key: _task_vectors(experts, base, key) for key in float_keys}
        masks = self._trim_masks(vectors, len(experts))
        merged: dict[str, Tensor] = {}
        for key, base_tensor in base.items():
            if key not in vectors:
                merged[key] = merge_integer_tensor(key, [expert[key] for expert in experts])
                continue
            combined = disjoint_merge(vectors[key] * masks[key], resolved)
            merged[key] = (base_tensor.double() + self.params.scaling * combined).to(base_tensor.dtype)
        return merged

    def _trim_masks(self, vectors: dict[str, Tensor], num_experts: int) -> dict[str, Tensor]:
        """Per key, a (experts, *shape) mask of the entries each task vector keeps."""
        density = self.params.density
        if self.params.scope == "per_tensor":
            return {
                key: torch.stack([keep_top_magnitudes(vector, density) for vector in stacked])
                for key, stacked in vectors.items()
            }
        keys = list(vectors)
        sizes = [vectors[key][0].numel() for key in keys]
        per_expert = []
        for expert_index in range(num_experts):
            whole_model = torch.cat([vectors[key][expert_index].flatten() for key in keys])
            per_expert.append(keep_top_magnitudes(whole_model, density).split(sizes))
        return {
            key: torch.stack([parts[position] for parts in per_expert]).view(vectors[key].shape)
            for position, key in enumerate(keys)
        }
