"""Semantic segmentation mIoU, single-domain (torchmetrics) and per domain with a harmonic mean."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.metrics.accuracy import domain_indices, harmonic_mean_tensor


def segmentation_miou(num_classes: int = 19, ignore_index: int = 255) -> MulticlassJaccardIndex:
    """Macro mIoU over the classes that occur in predictions or labels, ``ignore_index`` pixels excluded."""
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro")


class MultiDomainMeanIoU(Metric):
    """mIoU per target domain (in %), their harmonic mean and their mean, from per-domain confusion matrices.

    ``update(preds, target, domain)`` takes logits (N, C, H, W) or labels (N, H, W), targets (N, H, W)
    and one domain index for the batch or one per image. Pixels labelled ``ignore_index`` (or any label
    outside 0..C-1) are excluded. A class counts towards a domain's mean only if it occurs in that
    domain's labels or predictions (as in mmseg and torchmetrics' macro average).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, domains: Sequence[str], num_classes: int = 19, ignore_index: int = 255, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if len(domains) == 0 or num_classes < 1:
            raise ConfigError("MultiDomainMeanIoU needs at least one domain name and num_classes >= 1.")
        self.domains = list(domains)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        shape = (len(domains), num_classes, num_classes)
        self.add_state("confusion", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, domain: int | Tensor) -> None:
        labels = preds.argmax(1) if preds.ndim == target.ndim + 1 else preds
        image_domains = domain_indices(domain, target.shape[0], len(self.domains), target.device)
        pixel_domains = image_domains.view((-1,) + (1,) * (target.ndim - 1)).expand_as(target)
        classes = self.num_classes
        valid = (target != self.ignore_index) & (target >= 0) & (target < classes)
        cells = (pixel_domains[valid] * classes + target[valid].long()) * classes + labels[valid].long()
        counts = torch.bincount(cells, minlength=self.confusion.numel())
        self.confusion += counts.view(self.confusion.shape)

    def compute(self) -> dict[str, Tensor]:
        """``per_domain`` mIoU, ``per_class`` IoU (domains x classes, NaN if absent), ``hmean``, ``mean``."""
        confusion = self.confusion.double()
        intersection = confusion.diagonal(dim1=1, dim2=2)
        union = confusion.sum(2) + confusion.sum(1) - intersection
        per_class = 100.0 * intersection / union
        per_domain = per_class.nanmean(1)
        return {
            "per_domain": per_domain.float(),
            "per_class": per_class.float(),
            "hmean": harmonic_mean_tensor(per_domain).float(),
            "mean": per_domain.mean().float(),
        }
