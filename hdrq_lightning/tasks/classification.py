"""Image classification as a task object: its metric, loss, inference and names.

The evaluation loops (evaluation.py), the analysis (error barrier, loss surface, noise samples) and the report
ask the task instead of assuming classification; a segmentation task (mIoU with ignore index 255, sliding-window
inference) is the next implementation of the same interface. Chosen by ``conf/task/*.yaml`` (``_target_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from hdrq_lightning.metrics import MultiDomainAccuracy


class ClassificationTask:
    """Top-1 accuracy per domain and its harmonic mean; cross-entropy; whole-image inference."""

    name = "classification"
    metric_name = "accuracy"  # what the per-domain numbers are (in %)
    ignore_index: int | None = None  # label value that counts for neither loss nor metric (none here)

    def metric(self, domains: Sequence[str]) -> Metric:
        """Per-domain metric with ``update(logits, target, domain_index)``; ``compute()`` gives ``per_domain``,
        ``hmean`` and ``mean`` in %. No sync across processes: after a data-parallel run rank 0 sees every image."""
        return MultiDomainAccuracy(domains, sync_on_compute=False)

    def calibration_inputs(self, images: Tensor) -> Tensor:
        """What calibration (activation ranges, block reconstruction, GPTQ) feeds the network: the images."""
        return images

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """The model's logits for a batch of whole images."""
        return model(images)

    def loss(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy (the loss of the error barrier and the loss surface)."""
        return F.cross_entropy(logits, target, reduction=reduction,
                               ignore_index=-100 if self.ignore_index is None else self.ignore_index)

    @torch.no_grad()
    def hits(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """(correct predictions, counted samples) of a batch."""
        return int((logits.argmax(1) == target).sum()), int(target.numel())
