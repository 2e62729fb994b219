"""Segmentation training as LightningModules: supervised source training and HRDA self-training per target.

``SegSourceModule``: pixel cross-entropy on labelled source crops (multi-resolution when the network has a scale
attention head: 0.9 x fused + 0.1 x detail loss, as HRDA trains its source branch). ``HrdaModule``: HRDA (Hoyer et
al., 2022) with DACS self-training as the official HDRQ code runs it (design note segmentation.md 1.3): an EMA
teacher (``alpha_t = min(1 - 1/(t+1), ema_alpha)``, parameters only, BatchNorm in train mode unless
``teacher_bn=eval``) gives multi-resolution pseudo labels on the target crop (detail windows slid over it), weighted
per batch by the share of pixels at least ``pseudo_threshold`` confident; ClassMix pastes half of the source classes
onto the target image (classes drawn from the whole batch, the official behaviour, or per image); colour jitter
and blur on the mixed image; the loss is the mean over all pixels (ignored ones count as 0, as mmseg). AdamW with
the head at x``head_lr_mult``, no decay on norms and biases, linear warm-up then poly decay. Manual optimization
as the official code: the source loss (+ the feature distance) is backpropagated before the mixed image's forward,
so the two graphs never coexist, then one AdamW step. The teacher and the step counter are in the checkpoint, so a
resumed run continues the EMA; every random draw of a step (detail boxes, ClassMix classes, jitter, blur) comes from
(seed, step). Optional: the ImageNet feature distance on thing classes (``feature_distance`` > 0, needs the
ImageNet weights of the encoder: ``model.checkpoint_path``), pseudo-label margins (``pseudo_margins``), bf16
autocast, rare class sampling of the source crops (``rare_class_sampling.enabled``). Not built yet: activation
checkpointing (a recomputed BatchNorm in train mode would update its running statistics twice).
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
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
                 warmup: int, context_scale: float, detail_size: tuple[int, int], detail_weight: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        if iterations < 0:
            raise ConfigError(f"iterations={iterations} must be >= 0 (0: a source stage that only writes the "
                              "initial network, the paper's shared start).")
        self.model, self.dm = model, dm
        self.iterations, self.lr, self.head_lr_mult = iterations, lr, head_lr_mult
        self.weight_decay, self.warmup = weight_decay, warmup
        self.context_scale, self.detail_size, self.detail_weight = context_scale, tuple(detail_size), detail_weight

    epochs = 1  # one pass over the step-indexed batches, ended by max_steps (data/seg_datamodule.py::StepBatches)

    def configure_optimizers(self):
        return segmentation_optimizer(self.model, self.lr, self.head_lr_mult, self.weight_decay, self.warmup,
                                      self.iterations)

    def reseed(self) -> None:
        """The global generators from (seed, step): a step's random draws do not depend on what ran before."""
        torch.manual_seed((self.seed * 1_000_003 + int(self.global_step) * 7_919 + 29) % 2**63)


class SegSourceModule(_Base):
    """Supervised training on labelled source crops."""

    def __init__(self, model: nn.Module, dm, iterations: int = 400, lr: float = 2e-3, head_lr_mult: float = 1.0,
                 weight_decay: float = 0.01, warmup: int = 20, context_scale: float = 0.5,
                 detail_size: tuple[int, int] = (32, 32), detail_weight: float = 0.1) -> None:
        super().__init__(model, dm, iterations, lr, head_lr_mult, weight_decay, warmup, context_scale, detail_size,
                         detail_weight, seed=dm.seed)

    def train_dataloader(self):
        # read when iteration starts (after a checkpoint's step is restored): a resumed run continues there
        return self.dm.step_loader({"source": (self.dm.source, True)}, self.iterations,
                                   start=lambda: self.global_step)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        self.reseed()
        images, labels, _ = batch["source"]
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


THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # Cityscapes trainIds of things (HRDA's FD classes)


class HrdaModule(_Base):
    """HRDA self-training of the source model on one target (module docstring)."""

    def __init__(self, model: nn.Module, dm, target: str, iterations: int = 200, lr: float = 3e-4,
                 head_lr_mult: float = 10.0, weight_decay: float = 0.01, warmup: int = 20, ema_alpha: float = 0.99,
                 pseudo_threshold: float = 0.968, context_scale: float = 0.5, detail_size: tuple[int, int] = (32, 32),
                 detail_stride: tuple[int, int] = (16, 16), detail_weight: float = 0.1, classes_from: str = "batch",
                 teacher_bn: str = "train", jitter_prob: float = 0.8, jitter_strength: float = 0.2,
                 blur_prob: float = 0.5, pseudo_margins: dict[str, list[int]] | None = None,
                 feature_distance: float = 0.0, thing_classes: tuple[int, ...] = THING_CLASSES,
                 reference: nn.Module | None = None, bf16: bool = False,
                 rare_class_sampling: dict | None = None, activation_checkpointing: bool = False) -> None:
        super().__init__(model, dm, iterations, lr, head_lr_mult, weight_decay, warmup, context_scale, detail_size,
                         detail_weight, seed=dm.seed)
        if classes_from not in ("batch", "image") or teacher_bn not in ("train", "eval"):
            raise ConfigError(f"adapt.classes_from={classes_from!r} (batch | image) or adapt.teacher_bn="
                              f"{teacher_bn!r} (train | eval) is unknown.")
        if not 0 <= ema_alpha < 1:
            raise ConfigError(f"adapt.ema_alpha={ema_alpha} must lie in [0, 1).")
        if feature_distance > 0 and reference is None:
            raise ConfigError("adapt.feature_distance > 0 needs the ImageNet-initialised network as reference: set "
                              "model.pretrained=true model.checkpoint_path=<local encoder weights>, or set "
                              "adapt.feature_distance=0.")
        self.automatic_optimization = False
        self.target, self.ema_alpha, self.pseudo_threshold = target, ema_alpha, pseudo_threshold
        self.detail_stride, self.classes_from, self.teacher_bn = tuple(detail_stride), classes_from, teacher_bn
        self.jitter_prob, self.jitter_strength, self.blur_prob = jitter_prob, jitter_strength, blur_prob
        margins = (pseudo_margins or {}).get(target)
        self.margins = None if margins is None else tuple(int(m) for m in margins)  # top, bottom, left, right
        self.feature_distance, self.thing_classes = feature_distance, tuple(thing_classes)
        # kept out of the module tree (a list): not trained, not in checkpoints (rebuilt from its weight file)
        self._reference = [] if reference is None else [reference.requires_grad_(False).eval()]
        self.bf16 = bf16
        self.rare_class_sampling = dict(rare_class_sampling or {})
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        encoder = getattr(model, "encoder", None)
        if activation_checkpointing:
            if not hasattr(encoder, "checkpointing"):
                raise ConfigError("adapt.activation_checkpointing=true needs a SegNet encoder (models/segnet.py).")
            encoder.checkpointing = True  # the student's residual blocks (the teacher runs without gradients)
        mean = torch.tensor(dm.mean if dm.mean is not None else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(dm.std if dm.std is not None else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def train_dataloader(self):
        # read when iteration starts (after a checkpoint's step is restored): a resumed run continues there
        rcs = self.rare_class_sampling
        return self.dm.step_loader({"source": (self.dm.source, True), "target": (self.target, False)},
                                   self.iterations, start=lambda: self.global_step,
                                   rare_classes={"source": rcs} if rcs.get("enabled") else None)

    def on_fit_start(self) -> None:
        for reference in self._reference:
            reference.to(self.device)

    @staticmethod
    def ema_alpha_at(step: int, ema_alpha: float) -> float:
        return min(1 - 1 / (step + 1), ema_alpha)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- alpha teacher + (1 - alpha) student (parameters only), alpha = min(1 - 1/(t+1), ema_alpha);
        from the second step on (the teacher starts as the student)."""
        step = self.global_step
        if step == 0:
            return
        alpha = self.ema_alpha_at(step, self.ema_alpha)
        for teacher, student in zip(self.teacher.parameters(), self.model.parameters()):
            teacher.mul_(alpha).add_(student.detach(), alpha=1 - alpha)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(pseudo labels, per-pixel weights): the teacher's argmax; the weight is one number per batch, the share
        of valid pixels whose top probability reaches ``pseudo_threshold`` (0 on padding and in the margins)."""
        self.teacher.train(self.teacher_bn == "train")
        for module in self.teacher.modules():  # dropout off, BatchNorm as chosen
            if isinstance(module, nn.Dropout | nn.Dropout2d):
                module.eval()
        with self._autocast():
            logits = multires_inference(self.teacher, images, self.context_scale, self.detail_size,
                                        self.detail_stride)
        probabilities = torch.softmax(rescale_logits(logits.float(), tuple(images.shape[-2:])), dim=1)
        confidence, labels = probabilities.max(dim=1)
        share = ((confidence >= self.pseudo_threshold) & valid).sum() / valid.numel()
        weights = share * valid.float()
        if self.margins is not None:
            top, bottom, left, right = self.margins
            height, width = weights.shape[-2:]
            weights[:, :top] = 0
            weights[:, max(0, height - bottom):] = 0
            weights[:, :, :left] = 0
            weights[:, :, max(0, width - right):] = 0
        labels = torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX))
        return labels, weights

    def class_masks(self, labels: Tensor) -> Tensor:
        """ClassMix: per image, the pixels of half (rounded up) of the classes, drawn from the classes of the whole
        batch (255 included, the official code) or of the image (``classes_from=image``)."""
        masks = []
        batch_classes = torch.unique(labels)
        for image_labels in labels:
            classes = batch_classes if self.classes_from == "batch" else torch.unique(
                image_labels[image_labels != IGNORE_INDEX])
            chosen = classes[torch.randperm(len(classes), device=classes.device)[: (len(classes) + 1) // 2]]
            masks.append(torch.isin(image_labels, chosen))
        return torch.stack(masks)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _feature_distance(self, images: Tensor, labels: Tensor) -> Tensor:
        """lambda x mean squared L2 distance between the student's and the ImageNet network's last encoder level
        on the context-scale source image, over the feature cells whose label (downscaled) is a thing class."""
        context = F.interpolate(images, scale_factor=self.context_scale, mode="bilinear", align_corners=False)
        student = self.model.features(context)[-1]
        with torch.no_grad():
            reference = self._reference[0].features(context)[-1]
        distance = (student - reference).pow(2).sum(1).sqrt()  # [N, h, w]
        small = F.interpolate(labels[:, None].float(), size=distance.shape[-2:], mode="nearest")[:, 0].long()
        things = torch.isin(small, torch.tensor(self.thing_classes, device=small.device))
        if not things.any():
            return distance.sum() * 0
        return self.feature_distance * distance[things].mean()

    def training_step(self, batch, batch_idx: int) -> None:
        self.reseed()
        (source_images, source_labels, _), (target_images, valid, _) = batch["source"], batch["target"]
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        self.update_teacher()
        with self._autocast():
            source_loss = multires_loss(self.model, source_images, source_labels, None, self.context_scale,
                                        self.detail_size, self.detail_weight)
            if self.feature_distance > 0:
                source_loss = source_loss + self._feature_distance(source_images, source_labels)
        self.manual_backward(source_loss)  # the source graph is freed before the mixed image's forward
        pseudo, weights = self.pseudo_labels(target_images, valid)
        mask = self.class_masks(source_labels)
        mixed = torch.where(mask[:, None], source_images, target_images)
        mixed_labels = torch.where(mask, source_labels, pseudo)
        mixed_weights = torch.where(mask, torch.ones_like(weights), weights)
        if float(torch.rand(())) < self.jitter_prob:
            sigma = 0.15 + float(torch.rand(())) if float(torch.rand(())) < self.blur_prob else None
            mixed = _color_jitter(mixed, self.pixel_mean, self.pixel_std, self.jitter_strength, sigma)
        with self._autocast():
            mixed_loss = multires_loss(self.model, mixed, mixed_labels, mixed_weights, self.context_scale,
                                       self.detail_size, self.detail_weight)
        self.manual_backward(mixed_loss)
        optimizer.step()
        scheduler.step()
        self.log_dict({"adapt/train/source_loss": source_loss.detach(), "adapt/train/mixed_loss": mixed_loss.detach(),
                       "adapt/train/pseudo_weight": weights.max()}, prog_bar=True)
