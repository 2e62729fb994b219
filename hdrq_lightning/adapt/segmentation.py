"""Segmentation training as LightningModules: supervised source training and HRDA self-training per target.

``SegSourceModule``: pixel cross-entropy on labelled source crops (multi-resolution when the network has a scale
attention head: 0.9 x fused + 0.1 x detail loss, as HRDA trains its source branch). ``HrdaModule``: HRDA (Hoyer et
al., 2022) with DACS self-training as the official HDRQ code runs it (design note segmentation.md 1.3): an EMA
teacher (``alpha_t = min(1 - 1/(t+1), ema_alpha)``, parameters only, BatchNorm in train mode unless
``teacher_bn=eval``) gives multi-resolution pseudo labels on the target crop (detail windows slid over it), weighted
per batch by the share of pixels at least ``pseudo_threshold`` confident; ClassMix pastes half of the source classes
onto the target image (classes drawn from the whole batch, the official behaviour, or per image); colour jitter
and blur on the mixed image; the loss is the mean over all pixels (ignored ones count as 0, as mmseg). AdamW with
the head at x``head_lr_mult``, no decay on norms and biases, linear warm-up then poly decay. The teacher and the
step counter are in the checkpoint, so a resumed run continues the EMA. Not built yet: rare-class sampling and the
ImageNet feature distance (the built-in benchmark has no ImageNet weights); both are off in the paper's ablations'
"without" rows.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor, nn

from hdrq_lightning.data.joint_transforms import rescale_logits
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.hrda import multires_inference, random_detail_box, training_forward

IGNORE_INDEX = 255


def segmentation_optimizer(model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float, warmup: int,
                           iterations: int) -> dict:
    """AdamW: encoder at ``lr``, heads at ``lr * head_lr_mult``, no weight decay on norms and biases; linear
    warm-up from 1% over ``warmup`` steps, then poly (power 1) to 0 at ``iterations``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        head = not name.startswith("encoder.")
        no_decay = parameter.dim() == 1
        groups.setdefault((head, no_decay), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr * (head_lr_mult if head else 1.0), "weight_decay": 0.0 if no_decay else
          weight_decay} for (head, no_decay), params in groups.items()], lr=lr, betas=(0.9, 0.999))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / max(1, warmup)
        return max(0.0, 1.0 - (step - warmup) / max(1, iterations - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def pixel_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy per pixel (logits resized to the labels), ignored pixels 0, times ``weights``, averaged
    over all pixels (mmseg's ``reduction='none'`` then mean)."""
    loss = F.cross_entropy(rescale_logits(logits, tuple(labels.shape[-2:])), labels, ignore_index=IGNORE_INDEX,
                           reduction="none")
    return (loss if weights is None else loss * weights).mean()


def multires_loss(model: nn.Module, images: Tensor, labels: Tensor, weights: Tensor | None, context_scale: float,
                  detail_size: tuple[int, int], detail_weight: float) -> Tensor:
    """(1 - w) x fused loss + w x detail loss on one random detail window (plain loss without attention)."""
    if getattr(model, "attention_head", None) is None:
        return pixel_loss(model(images), labels, weights)
    box = random_detail_box(images.shape[-2], images.shape[-1], detail_size)
    fused, detail = training_forward(model, images, box, context_scale)
    top, left, bottom, right = box
    crop_weights = None if weights is None else weights[:, top:bottom, left:right]
    return ((1 - detail_weight) * pixel_loss(fused, labels, weights)
            + detail_weight * pixel_loss(detail, labels[:, top:bottom, left:right], crop_weights))


class _Base(L.LightningModule):
    def __init__(self, model: nn.Module, dm, iterations: int, lr: float, head_lr_mult: float, weight_decay: float,
                 warmup: int, context_scale: float, detail_size: tuple[int, int], detail_weight: float) -> None:
        super().__init__()
        if iterations < 1:
            raise ConfigError(f"iterations={iterations} must be positive.")
        self.model, self.dm = model, dm
        self.iterations, self.lr, self.head_lr_mult = iterations, lr, head_lr_mult
        self.weight_decay, self.warmup = weight_decay, warmup
        self.context_scale, self.detail_size, self.detail_weight = context_scale, tuple(detail_size), detail_weight

    @property
    def epochs(self) -> int:
        """Epochs of the longest training stream that cover ``iterations`` steps (the Trainer stops at
        ``max_steps``)."""
        return math.ceil(self.iterations / max(1, self.steps_per_epoch()))

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def configure_optimizers(self):
        return segmentation_optimizer(self.model, self.lr, self.head_lr_mult, self.weight_decay, self.warmup,
                                      self.iterations)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self._trainer is not None else 0


class SegSourceModule(_Base):
    """Supervised training on labelled source crops."""

    def __init__(self, model: nn.Module, dm, iterations: int = 400, lr: float = 2e-3, head_lr_mult: float = 1.0,
                 weight_decay: float = 0.01, warmup: int = 20, context_scale: float = 0.5,
                 detail_size: tuple[int, int] = (32, 32), detail_weight: float = 0.1) -> None:
        super().__init__(model, dm, iterations, lr, head_lr_mult, weight_decay, warmup, context_scale, detail_size,
                         detail_weight)

    def steps_per_epoch(self) -> int:
        return len(self.dm.dataset(self.dm.source, "train", train=True)) // self.dm.batch_size

    def train_dataloader(self):
        self.dm.epoch = self._epoch
        return self.dm.train_loader(self.dm.source, labels=True)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        loss = multires_loss(self.model, images, labels, None, self.context_scale, self.detail_size,
                             self.detail_weight)
        self.log("source/train/loss", loss, prog_bar=True)
        return loss


def _color_jitter(images: Tensor, mean: Tensor, std: Tensor, strength: float, blur_sigma: float | None) -> Tensor:
    """Brightness, contrast and saturation jitter of one draw for the batch, then an optional Gaussian blur (on
    de-normalised [0, 1] images, normalised again after)."""
    x = images * std + mean
    factors = 1 + (torch.rand(3, device=x.device) * 2 - 1) * strength
    x = x * factors[0]
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - grey) * factors[1] + grey
    luma = x.mean(dim=1, keepdim=True)
    x = (x - luma) * factors[2] + luma
    if blur_sigma is not None:
        radius = max(1, int(round(2 * blur_sigma)))
        kernel = torch.exp(-(torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype) ** 2)
                           / (2 * blur_sigma**2))
        kernel = kernel / kernel.sum()
        channels = x.shape[1]
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"),
                     kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"),
                     kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return (x.clamp(0, 1) - mean) / std


class HrdaModule(_Base):
    """HRDA self-training of the source model on one target (module docstring)."""

    def __init__(self, model: nn.Module, dm, target: str, iterations: int = 200, lr: float = 3e-4,
                 head_lr_mult: float = 10.0, weight_decay: float = 0.01, warmup: int = 20, ema_alpha: float = 0.99,
                 pseudo_threshold: float = 0.968, context_scale: float = 0.5, detail_size: tuple[int, int] = (32, 32),
                 detail_stride: tuple[int, int] = (16, 16), detail_weight: float = 0.1, classes_from: str = "batch",
                 teacher_bn: str = "train", jitter_prob: float = 0.8, jitter_strength: float = 0.2,
                 blur_prob: float = 0.5) -> None:
        super().__init__(model, dm, iterations, lr, head_lr_mult, weight_decay, warmup, context_scale, detail_size,
                         detail_weight)
        if classes_from not in ("batch", "image") or teacher_bn not in ("train", "eval"):
            raise ConfigError(f"adapt.classes_from={classes_from!r} (batch | image) or adapt.teacher_bn="
                              f"{teacher_bn!r} (train | eval) is unknown.")
        if not 0 <= ema_alpha < 1:
            raise ConfigError(f"adapt.ema_alpha={ema_alpha} must lie in [0, 1).")
        self.target, self.ema_alpha, self.pseudo_threshold = target, ema_alpha, pseudo_threshold
        self.detail_stride, self.classes_from, self.teacher_bn = tuple(detail_stride), classes_from, teacher_bn
        self.jitter_prob, self.jitter_strength, self.blur_prob = jitter_prob, jitter_strength, blur_prob
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        mean = torch.tensor(dm.mean if dm.mean is not None else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(dm.std if dm.std is not None else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def steps_per_epoch(self) -> int:
        sizes = [len(self.dm.dataset(domain, "train", train=True, labels=False)) for domain in
                 (self.dm.source, self.target)]
        return max(sizes) // self.dm.batch_size

    def train_dataloader(self):
        self.dm.epoch = self._epoch
        return CombinedLoader({"source": self.dm.train_loader(self.dm.source, labels=True),
                               "target": self.dm.train_loader(self.target, labels=False)}, mode="max_size_cycle")

    @torch.no_grad()
    def _update_teacher(self) -> None:
        step = self.global_step
        if step == 0:
            return
        alpha = min(1 - 1 / (step + 1), self.ema_alpha)
        for teacher, student in zip(self.teacher.parameters(), self.model.parameters()):
            teacher.mul_(alpha).add_(student.detach(), alpha=1 - alpha)

    @torch.no_grad()
    def _pseudo_labels(self, images: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        self.teacher.train(self.teacher_bn == "train")
        for module in self.teacher.modules():  # dropout off, BatchNorm as chosen
            if isinstance(module, nn.Dropout | nn.Dropout2d):
                module.eval()
        logits = multires_inference(self.teacher, images, self.context_scale, self.detail_size, self.detail_stride)
        probabilities = torch.softmax(rescale_logits(logits, tuple(images.shape[-2:])), dim=1)
        confidence, labels = probabilities.max(dim=1)
        share = ((confidence >= self.pseudo_threshold) & valid).sum() / valid.numel()
        labels = torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX))
        return labels, share * valid.float()

    def _class_masks(self, labels: Tensor) -> Tensor:
        masks = []
        batch_classes = torch.unique(labels)  # the official quirk: classes of the whole batch, 255 included
        for image_labels in labels:
            classes = batch_classes if self.classes_from == "batch" else torch.unique(
                image_labels[image_labels != IGNORE_INDEX])
            chosen = classes[torch.randperm(len(classes), device=classes.device)[: (len(classes) + 1) // 2]]
            masks.append(torch.isin(image_labels, chosen))
        return torch.stack(masks)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        (source_images, source_labels, _), (target_images, valid, _) = batch["source"], batch["target"]
        self._update_teacher()
        source_loss = multires_loss(self.model, source_images, source_labels, None, self.context_scale,
                                    self.detail_size, self.detail_weight)
        pseudo, weights = self._pseudo_labels(target_images, valid)
        mask = self._class_masks(source_labels)
        mixed = torch.where(mask[:, None], source_images, target_images)
        mixed_labels = torch.where(mask, source_labels, pseudo)
        mixed_weights = torch.where(mask, torch.ones_like(weights), weights)
        if float(torch.rand(())) < self.jitter_prob:
            sigma = 0.15 + float(torch.rand(())) if float(torch.rand(())) < self.blur_prob else None
            mixed = _color_jitter(mixed, self.pixel_mean, self.pixel_std, self.jitter_strength, sigma)
        mixed_loss = multires_loss(self.model, mixed, mixed_labels, mixed_weights, self.context_scale,
                                   self.detail_size, self.detail_weight)
        loss = source_loss + mixed_loss
        self.log_dict({"adapt/train/source_loss": source_loss, "adapt/train/mixed_loss": mixed_loss,
                       "adapt/train/pseudo_weight": weights.max()}, prog_bar=True)
        return loss
