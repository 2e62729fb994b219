"""HRDA's multi-resolution forward, training and inference, as functions over a ``SegNet`` (models/segnet.py).

A crop is seen twice: the **context** pass on the crop downscaled by ``context_scale`` (0.5) and the **detail**
pass on a full-resolution window of it. The class-wise scale attention ``a = sigmoid(attention(context
features))`` fuses them on the crop's 1/4 grid: ``fused = a * detail + (1 - a) * context`` (Hoyer et al., 2022),
``a`` zeroed outside the detail window in training. Inference slides detail windows (``detail_size``, stride
``detail_stride``) over the whole input and averages overlaps (``hr_slide_inference``), and may slide outer
windows over a large image (the official 1024 / 512 test slide). All outputs are logits on the 1/4 grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                       align_corners=False)


def context_pass(model: nn.Module, crop: Tensor, context_scale: float) -> tuple[Tensor, Tensor]:
    """(context logits, attention logits), both resized to the crop's 1/4 grid."""
    context = F.interpolate(crop, scale_factor=context_scale, mode="bilinear", align_corners=False)
    levels = model.features(context)
    grid = (crop.shape[-2] // 4, crop.shape[-1] // 4)
    return _resize(model.decode(levels), grid), _resize(model.attention(levels), grid)


def random_detail_box(height: int, width: int, size: tuple[int, int], divisible: int = 8,
                      generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a ``size`` window inside a height x width crop, corners divisible by
    ``divisible`` (HRDA's ``crop_divisible``)."""
    h, w = min(size[0], height), min(size[1], width)
    rows, cols = (height - h) // divisible + 1, (width - w) // divisible + 1
    top = int(torch.randint(0, rows, (), generator=generator)) * divisible
    left = int(torch.randint(0, cols, (), generator=generator)) * divisible
    return top, left, top + h, left + w


def training_forward(model: nn.Module, crop: Tensor, box: tuple[int, int, int, int], context_scale: float = 0.5
                     ) -> tuple[Tensor, Tensor]:
    """(fused logits on the crop's 1/4 grid, detail logits on the window's 1/4 grid) for one detail ``box``."""
    context, attention = context_pass(model, crop, context_scale)
    top, left, bottom, right = box
    detail = model(crop[:, :, top:bottom, left:right])
    detail = _resize(detail, ((bottom - top) // 4, (right - left) // 4))
    placed = torch.zeros_like(context)
    mask = torch.zeros_like(attention)
    placed[:, :, top // 4:bottom // 4, left // 4:right // 4] = detail
    mask[:, :, top // 4:bottom // 4, left // 4:right // 4] = 1
    a = torch.sigmoid(attention) * mask
    return a * placed + (1 - a) * context, detail


def slide(fn: Callable[[Tensor], Tensor], images: Tensor, window: tuple[int, int], stride: tuple[int, int],
          channels: int) -> Tensor:
    """``fn`` (input window -> logits on its 1/4 grid) over overlapping windows of ``images``, averaged on the
    images' 1/4 grid. Windows larger than the image shrink to it; the last window of a row or column ends at
    the border (mmseg's slide)."""
    n, _, height, width = images.shape
    wh, ww = min(window[0], height), min(window[1], width)
    sh, sw = stride
    rows = max(1, -(-(height - wh) // sh) + 1)
    cols = max(1, -(-(width - ww) // sw) + 1)
    out = images.new_zeros(n, channels, height // 4, width // 4)
    count = images.new_zeros(1, 1, height // 4, width // 4)
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * sh, height - wh), min(c * sw, width - ww)
            logits = _resize(fn(images[:, :, top:top + wh, left:left + ww]), (wh // 4, ww // 4))
            out[:, :, top // 4:(top + wh) // 4, left // 4:(left + ww) // 4] += logits
            count[:, :, top // 4:(top + wh) // 4, left // 4:(left + ww) // 4] += 1
    return out / count


def multires_inference(model: nn.Module, images: Tensor, context_scale: float = 0.5,
                       detail_size: tuple[int, int] = (512, 512), detail_stride: tuple[int, int] = (256, 256),
                       window: tuple[int, int] | None = None, window_stride: tuple[int, int] | None = None
                       ) -> Tensor:
    """Fused logits on the 1/4 grid of ``images``: per (outer) window the context pass and the detail slide."""
    num_classes = model.num_classes

    def one_window(x: Tensor) -> Tensor:
        context, attention = context_pass(model, x, context_scale)
        detail = slide(model, x, detail_size, detail_stride, num_classes)
        a = torch.sigmoid(attention)
        return a * detail + (1 - a) * context

    if window is None:
        return one_window(images)
    return slide(one_window, images, window, window_stride or window, num_classes)
