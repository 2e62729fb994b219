"""Weighted averaging of experts (mid-point merging, Li et al. 2024).

With BN folded into the convolutions an average of the weights is all there is. With unfolded
BatchNorm, each layer's running statistics describe the activations seen by that expert; the merged
statistics are those of the Gaussian mixture of the experts, weighted by the batches each has seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hdrq_lightning.merge.registry import (
    MergeMethod,
    StateDict,
    check_matching_states,
    merge_integer_tensor,
    merge_method,
    resolve_weights,
    weighted_sum,
)

BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_prefixes(keys: Sequence[str]) -> list[str]:
    """Prefixes ``p`` with all of ``p.running_mean``, ``p.running_var`` and ``p.num_batches_tracked``."""
    key_set = set(keys)
    suffix = "." + BATCH_NORM_BUFFERS[0]
    prefixes = [key[: -len(suffix)] for key in keys if key.endswith(suffix)]
    return [
        prefix for prefix in prefixes if all(f"{prefix}.{buffer}" in key_set for buffer in BATCH_NORM_BUFFERS)
    ]


def merge_batch_norm_buffers(
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    batch_counts: Sequence[Tensor],
    weights: Sequence[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the mixture of the experts' Gaussians, weighted by batches seen (``weights`` if none were).

    Returns (mean, variance, batch count): mu = sum_k w_k mu_k, var = sum_k w_k (var_k + mu_k^2) - mu^2.
    """
    counts = torch.stack([count.double() for count in batch_counts])
    fallback = torch.tensor(weights, dtype=torch.float64, device=counts.device)
    total = counts.sum()
    mixture = torch.where(total > 0, counts / total.clamp_min(1.0), fallback)
    stacked_means = torch.stack([mean.double() for mean in means])
    stacked_variances = torch.stack([variance.double() for variance in variances])
    shape = (-1,) + (1,) * (stacked_means.ndim - 1)
    mixture = mixture.view(shape)
    mean = (mixture * stacked_means).sum(0)
    second_moment = (mixture * (stacked_variances + stacked_means.square())).sum(0)
    variance = (second_moment - mean.square()).clamp_min(0.0)
    merged_count = torch.stack(list(batch_counts)).sum(0).to(batch_counts[0].dtype)
    return mean.to(means[0].dtype), variance.to(variances[0].dtype), merged_count


def average_states(
    experts: Sequence[StateDict], weights: Sequence[float], keys: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Average ``keys`` (all of expert 0's by default) with normalised ``weights``.

    Floating tensors are averaged, BatchNorm buffer triplets merged as a mixture, integer tensors
    merged by :func:`merge_integer_tensor`.
    """
    keys = list(experts[0]) if keys is None else list(keys)
    merged: dict[str, Tensor] = {}
    for prefix in batch_norm_prefixes(keys):
        buffers = [[expert[f"{prefix}.{name}"] for expert in experts] for name in BATCH_NORM_BUFFERS]
        for name, tensor in zip(BATCH_NORM_BUFFERS, merge_batch_norm_buffers(*buffers, weights)):
            merged[f"{prefix}.{name}"] = tensor
    for key in keys:
        if key in merged:
            continue
        tensors = [expert[key] for expert in experts]
        if tensors[0].is_floating_point():
            merged[key] = weighted_sum(tensors, weights)
        else:
            merged[key] = merge_integer_tensor(key, tensors)
    return {key: merged[key] for key in keys}


@merge_method("mean")
class MeanMerge(MergeMethod):
    """Weighted average of the experts (weights normalised to sum to one; ``base`` is not used)."""

    @dataclass
    class Params:
        """The mean merge has no parameters."""

    def merge(
        self,
        experts: Sequence[StateDict],
        base: StateDict | None = None,
        weights: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        check_matching_states(experts)
        resolved = resolve_weights(weights, len(experts), normalise=True, default=1.0)
        return average_states(experts, resolved)
