"""Transforms of an image and its label map together (segmentation): resize, crop, flip, tensors, normalise.

Geometry is applied to both with the label's own interpolation (bilinear image, nearest label), so a label pixel
always describes the image pixel under it. An op is ``op(image, label, valid) -> (image, label, valid)`` on PIL
images; ``label`` is None for an unlabeled item (a target image in adaptation), whose ``valid`` mask (True on real
image pixels, False on padding) travels instead. Random decisions use torch's generator, which DataLoader seeds
per worker (and Lightning's ``seed_everything(workers=True)`` per run).

Evaluation as mmseg's test pipeline: ``JointTransform([Resize(...)], resize_label=False)`` resizes the image only,
the label keeps its original size, and ``rescale_logits`` brings the prediction back to it before the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hdrq_lightning.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = (123.675, 116.28, 103.53) / 255, mmseg's values
IMAGENET_STD = (0.229, 0.224, 0.225)  # = (58.395, 57.12, 57.375) / 255
IGNORE_INDEX = 255

Triple = tuple[Image.Image, Image.Image | None, Image.Image | None]


def fit_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the (width, height) of ``size`` scaled so that the long side fits the long
    side of ``scale`` and the short side its short side (e.g. 1920x1080 into (2048, 1024) -> 1820x1024)."""
    width, height = size
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


class Resize:
    """Keep-ratio resize into ``scale`` (``keep_ratio=False``: exactly ``scale`` as (width, height)), with an
    optional random ratio range (mmseg's ``ratio_range``)."""

    def __init__(self, scale: Sequence[int], keep_ratio: bool = True, ratio_range: Sequence[float] | None = None,
                 resize_label: bool = True) -> None:
        if len(scale) != 2 or min(scale) <= 0:
            raise ConfigError(f"Resize scale {scale} must be (width, height) with positive sides.")
        self.scale, self.keep_ratio, self.resize_label = (int(scale[0]), int(scale[1])), keep_ratio, resize_label
        self.ratio_range = tuple(ratio_range) if ratio_range else None

    def __call__(self, image: Image.Image, label: Image.Image | None, valid: Image.Image | None) -> Triple:
        scale = self.scale
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
            scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        size = fit_size(image.size, scale) if self.keep_ratio else scale
        image = image.resize(size, Image.BILINEAR)
        if self.resize_label:
            label = None if label is None else label.resize(size, Image.NEAREST)
            valid = None if valid is None else valid.resize(size, Image.NEAREST)
        return image, label, valid


class RandomCrop:
    """A ``size`` = (height, width) crop; padded (image 0, label 255, valid False) where the image is smaller.
    ``cat_max_ratio`` (mmseg): up to 10 tries for a crop whose most frequent class covers less than that share of
    its labelled pixels; it reads the label, so it is refused on unlabeled items (no target-label leak)."""

    def __init__(self, size: Sequence[int], cat_max_ratio: float | None = None) -> None:
        self.height, self.width = int(size[0]), int(size[1])
        self.cat_max_ratio = cat_max_ratio

    def _window(self, width: int, height: int) -> tuple[int, int]:
        x = int(torch.randint(0, max(width - self.width, 0) + 1, ()))
        y = int(torch.randint(0, max(height - self.height, 0) + 1, ()))
        return x, y

    def __call__(self, image: Image.Image, label: Image.Image | None, valid: Image.Image | None) -> Triple:
        if valid is None and label is None:
            valid = Image.new("L", image.size, 1)
        x, y = self._window(*image.size)
        if self.cat_max_ratio is not None and self.cat_max_ratio < 1.0:
            if label is None:
                raise ConfigError("RandomCrop(cat_max_ratio=...) reads the label; it cannot be used on unlabeled "
                                  "(target) items.")
            for _ in range(10):
                window = np.asarray(label.crop((x, y, x + self.width, y + self.height)))
                counts = np.bincount(window[window != IGNORE_INDEX].reshape(-1), minlength=1)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                x, y = self._window(*image.size)
        box = (x, y, x + self.width, y + self.height)  # PIL pads outside the image with 0
        image = image.crop(box)
        if label is not None:
            label = _crop_fill(label, box, IGNORE_INDEX)
        if valid is not None:
            valid = _crop_fill(valid, box, 0)
        return image, label, valid


def _crop_fill(mask: Image.Image, box: tuple[int, int, int, int], fill: int) -> Image.Image:
    out = Image.new(mask.mode, (box[2] - box[0], box[3] - box[1]), fill)
    out.paste(mask.crop((max(box[0], 0), max(box[1], 0), min(box[2], mask.width), min(box[3], mask.height))),
              (max(-box[0], 0), max(-box[1], 0)))
    return out


class RandomFlip:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image, label: Image.Image | None, valid: Image.Image | None) -> Triple:
        if float(torch.rand(())) < self.p:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            image = image.transpose(flip)
            label = None if label is None else label.transpose(flip)
            valid = None if valid is None else valid.transpose(flip)
        return image, label, valid


def to_tensors(image: Image.Image, label: Image.Image | None, valid: Image.Image | None = None
               ) -> tuple[Tensor, Tensor]:
    """(image float [3, H, W] in [0, 1], label int64 [H, W]) or, unlabeled, (image, valid bool [H, W])."""
    tensor = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    if label is not None:
        return tensor, torch.from_numpy(np.asarray(label, dtype=np.uint8).astype(np.int64))
    if valid is None:
        return tensor, torch.ones(tensor.shape[1:], dtype=torch.bool)
    return tensor, torch.from_numpy(np.asarray(valid, dtype=np.uint8) > 0)


class JointTransform:
    """``ops`` in order, then tensors, then per-channel normalisation (``mean``/``std`` on [0, 1] values; None:
    none). Called as ``transform(image, label)`` with ``label`` None for unlabeled items."""

    def __init__(self, ops: Sequence, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD) -> None:
        self.ops = list(ops)
        self.mean = None if mean is None else torch.tensor(mean).view(3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, label: Image.Image | None) -> tuple[Tensor, Tensor]:
        valid = None
        for op in self.ops:
            image, label, valid = op(image, label, valid)
        tensor, second = to_tensors(image, label, valid)
        if self.mean is not None:
            tensor = (tensor - self.mean) / self.std
        return tensor, second


def rescale_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits [N, C, h, w] resized (bilinear) to the label size (H, W) before the argmax (mmseg's rescale)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
