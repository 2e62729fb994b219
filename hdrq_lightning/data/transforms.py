"""Image transforms of each dataset, on PIL images, returning normalised float CxHxW tensors.

Office-Home follows SHOT: train Resize -> RandomCrop -> horizontal flip, test Resize -> CenterCrop,
ImageNet normalisation. Digits are already 32x32: train pads and randomly crops (no flips, digits are
not flip-invariant), test only normalises; both map [0, 1] to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from hdrq_lightning.data.digits import DIGITS_IMAGE_SIZE
from hdrq_lightning.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DIGITS_CROP_PADDING = 2
TRANSFORM_DATASETS: tuple[str, ...] = ("digits", "office_home")


def _digits_transforms(train: bool, image_size: int) -> list[Callable]:
    steps: list[Callable] = []
    if image_size != DIGITS_IMAGE_SIZE:
        steps.append(T.Resize((image_size, image_size)))
    if train:
        steps.append(T.RandomCrop(image_size, padding=DIGITS_CROP_PADDING))
    return steps + [T.ToTensor(), T.Normalize(DIGITS_MEAN, DIGITS_STD)]


def _office_home_transforms(train: bool, image_size: int, resize_size: int) -> list[Callable]:
    if resize_size < image_size:
        raise ConfigError(
            f"resize_size ({resize_size}) is smaller than image_size ({image_size}); "
            "set resize_size >= image_size (SHOT uses 256 and 224)."
        )
    if train:
        steps = [T.Resize(resize_size), T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize_size), T.CenterCrop(image_size)]
    return steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_transforms(
    dataset: str, train: bool, image_size: int = 224, resize_size: int = 256
) -> Callable[[Image.Image], Tensor]:
    """PIL image -> normalised tensor for ``dataset``, with augmentation when ``train``.

    ``resize_size`` is the shorter side before cropping (Office-Home); digits ignore it.
    """
    if image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}.")
    if dataset == "digits":
        return T.Compose(_digits_transforms(train, image_size))
    if dataset == "office_home":
        return T.Compose(_office_home_transforms(train, image_size, resize_size))
    raise ConfigError(f"Unknown dataset {dataset!r} for transforms; choose one of {', '.join(TRANSFORM_DATASETS)}.")
