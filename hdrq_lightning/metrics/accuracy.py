"""Per-domain classification accuracy and the harmonic mean over domains (the paper's main metric)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from hdrq_lightning.errors import ConfigError


def harmonic_mean_tensor(values: Tensor) -> Tensor:
    """Harmonic mean over the last axis, 0 where any value is 0 (NaN propagates)."""
    return values.shape[-1] / values.reciprocal().sum(-1)


def harmonic_mean(values: Sequence[float] | Tensor) -> float:
    """Harmonic mean of non-negative values; 0 if any value is 0."""
    tensor = torch.as_tensor(values, dtype=torch.float64).flatten()
    if tensor.numel() == 0:
        raise ConfigError("harmonic_mean got no values; pass at least one per-domain score.")
    if bool((tensor < 0).any()):
        raise ConfigError(f"harmonic_mean needs non-negative values, got {tensor.tolist()}.")
    return float(harmonic_mean_tensor(tensor))


def domain_indices(domain: int | Tensor, count: int, num_domains: int, device: torch.device) -> Tensor:
    """Per-sample domain indices from one domain index for the batch or a per-sample tensor."""
    if isinstance(domain, int) or (isinstance(domain, Tensor) and domain.ndim == 0):
        index = int(domain)
        if not 0 <= index < num_domains:
            raise ConfigError(
                f"Domain index {index} is out of range for {num_domains} domains; pass 0..{num_domains - 1}."
            )
        return torch.full((count,), index, dtype=torch.long, device=device)
    return domain.to(device=device, dtype=torch.long).flatten()


class MultiDomainAccuracy(Metric):
    """Top-1 accuracy per target domain (in %), their harmonic mean and their mean.

    ``update(preds, target, domain)`` takes logits (N, C) or labels (N,), and one domain index for the
    whole batch or one per sample. Count states are summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, domains: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(domains) == 0:
            raise ConfigError("MultiDomainAccuracy needs at least one domain name.")
        self.domains = list(domains)
        self.add_state("correct", default=torch.zeros(len(domains), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(domains), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, domain: int | Tensor) -> None:
        labels = preds.argmax(1) if preds.ndim == target.ndim + 1 else preds
        hits = (labels.flatten() == target.flatten()).long()
        index = domain_indices(domain, hits.numel(), len(self.domains), hits.device)
        self.correct.index_add_(0, index, hits)
        self.total.index_add_(0, index, torch.ones_like(hits))

    def compute(self) -> dict[str, Tensor]:
        """``per_domain`` (NaN for a domain without samples), ``hmean`` and ``mean``, all in %."""
        per_domain = 100.0 * self.correct.double() / self.total.double()
        return {
            "per_domain": per_domain.float(),
            "hmean": harmonic_mean_tensor(per_domain).float(),
            "mean": per_domain.mean().float(),
        }
