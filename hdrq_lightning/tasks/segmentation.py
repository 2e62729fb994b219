"""Semantic segmentation as a task object: mIoU per domain (ignore 255), pixel cross-entropy, and whole-image
or HRDA multi-resolution inference (models/hrda.py), predictions resized to the label size before the argmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from hdrq_lightning.data.joint_transforms import rescale_logits
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.metrics import MultiDomainMeanIoU
from hdrq_lightning.models.hrda import multires_inference


class _LabelSizeMeanIoU(MultiDomainMeanIoU):
    """MultiDomainMeanIoU whose logits are resized to the label size first (mmseg's ``rescale=True``)."""

    def update(self, preds: Tensor, target: Tensor, domain: int | Tensor) -> None:
        if preds.ndim == target.ndim + 1:
            preds = rescale_logits(preds, tuple(target.shape[-2:]))
        super().update(preds, target, domain)


class SegmentationTask:
    """mIoU per domain and its harmonic mean; cross-entropy with ``ignore_index``; ``inference``: ``whole``
    (one forward) or ``multires`` (HRDA: context at ``context_scale`` + detail windows, optional outer slide)."""

    name = "segmentation"
    metric_name = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int = 255, inference: str = "multires",
                 context_scale: float = 0.5, detail_size: Sequence[int] = (512, 512),
                 detail_stride: Sequence[int] = (256, 256), window: Sequence[int] | None = None,
                 window_stride: Sequence[int] | None = None) -> None:
        if inference not in ("whole", "multires"):
            raise ConfigError(f"task.inference={inference!r} is unknown; use whole or multires.")
        self.num_classes, self.ignore_index, self.inference = num_classes, ignore_index, inference
        self.context_scale = context_scale
        self.detail_size, self.detail_stride = tuple(detail_size), tuple(detail_stride)
        self.window = None if window is None else tuple(window)
        self.window_stride = None if window_stride is None else tuple(window_stride)

    def metric(self, domains: Sequence[str]) -> Metric:
        return _LabelSizeMeanIoU(domains, self.num_classes, self.ignore_index, sync_on_compute=False)

    def calibration_inputs(self, images: Tensor) -> Tensor:
        """The calibration crops as the network first sees them: under multi-resolution inference the context pass,
        i.e. the crop downscaled by ``context_scale`` (what the official code's hooks capture on a unit's first
        call); under whole-image inference the crops themselves."""
        if self.inference != "multires":
            return images
        return F.interpolate(images, scale_factor=self.context_scale, mode="bilinear", align_corners=False)

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        """Logits at the input image's size."""
        if self.inference == "multires" and getattr(model, "attention_head", None) is not None:
            logits = multires_inference(model, images, self.context_scale, self.detail_size, self.detail_stride,
                                        self.window, self.window_stride)
        else:
            logits = model(images)
        return rescale_logits(logits, tuple(images.shape[-2:]))

    def loss(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        logits = rescale_logits(logits, tuple(target.shape[-2:]))
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=reduction)

    @torch.no_grad()
    def hits(self, logits: Tensor, target: Tensor) -> tuple[int, int]:
        """(correctly labelled pixels, labelled pixels)."""
        logits = rescale_logits(logits, tuple(target.shape[-2:]))
        valid = target != self.ignore_index
        return int(((logits.argmax(1) == target) & valid).sum()), int(valid.sum())
