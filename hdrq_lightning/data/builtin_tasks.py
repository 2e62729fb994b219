"""Built-in multi-task benchmark (the task-arithmetic setting on data that installed packages ship; no download).

Four classification tasks, each with its own classes and head (models/multitask.py), for a vision transformer
trained from scratch on a 2-core CPU (bench/tasks_vit_spike.py found this protocol and measured it):

- ``digit``: the clean digits (10 classes);
- ``textured``: digits on texture photographs (10);
- ``parity``: rotated digits, odd or even (2);
- ``photo``: which of ten photographs (scikit-image's and scikit-learn's sample images) a 32x32 crop comes from
  (10); train crops from the left 70% of each photo, test crops from the right 30%.

The base model does not train on them: its ``pretext`` (the source domain of this data) is the `negative` digits'
own labels (a supervised task of another domain, as a CLIP base has seen labelled data of other kinds) and
4-way rotation prediction on photo crops (``pretext_sets``). Digits use the project's seeded train/test split of
the digit indices (data/digits.py), so no test digit of any task is seen in training of any task or the pretext.

Images are standardised per channel with the pretext images' mean and std. Items are ``(image, label, index)``;
the interface is the one the stages read: ``source``, ``targets``, ``num_classes`` (``{task: classes}``),
``loader(task, split)``, ``calibration_loader(task, size)``, ``dataset(task, split)``, ``has_split``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hdrq_lightning.data.datamodule import TaskSets
from hdrq_lightning.data.digits import render_digits_domain
from hdrq_lightning.errors import ConfigError

TASKS: dict[str, int] = {"digit": 10, "textured": 10, "parity": 2, "photo": 10}
PRETEXT = "pretext"
SPLITS = TaskSets.splits
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "grass", "gravel", "brick", "china", "flower")
CROP, PHOTO_SIDE, PHOTO_TRAIN_FRACTION = 32, 128, 0.7
_DIGIT_TASKS = {"digit": "clean", "textured": "textured", "parity": "rotated"}


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Tensor, ...]:
    """The ten photographs as float CxHxW tensors in [0, 1], short side resized to 128 px."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    out = []
    for name in PHOTOS:
        photo = load_sample_image(f"{name}.jpg") if name in ("china", "flower") else getattr(skimage.data, name)()
        photo = np.asarray(photo, np.float32) / 255.0
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(photo[..., :3])).permute(2, 0, 1)[None]
        scale = PHOTO_SIDE / min(tensor.shape[-2:])
        out.append(F.interpolate(tensor, scale_factor=scale, mode="bilinear", align_corners=False)[0])
    return tuple(out)


def photo_crops(per_photo: int, part: str, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``per_photo`` random 32x32 crops of each photograph from its ``left`` 70% or ``right`` 30% (labels: the
    photo's index), in a shuffled order."""
    images, labels = [], []
    for label, photo in enumerate(_photos()):
        width = photo.shape[-1]
        cut = int(PHOTO_TRAIN_FRACTION * width)
        lo, hi = (0, cut - CROP) if part == "left" else (cut, width - CROP)
        for _ in range(per_photo):
            x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(0, photo.shape[-2] - CROP + 1))
            images.append(photo[:, y:y + CROP, x:x + CROP])
            labels.append(label)
    order = torch.from_numpy(rng.permutation(len(labels)))
    return torch.stack(images)[order], torch.tensor(labels)[order]


def digits_tensors(domain: str, split: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) float in [0, 1] and labels of one digits domain's train or test pool."""
    images, labels = render_digits_domain(domain, split, seed)
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels.copy())


def _rotations(images: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    turns = torch.from_numpy(rng.integers(0, 4, len(images)))
    return torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(images, turns)]), turns


class TensorItems(Dataset):
    """``(image, label, index)`` items of in-memory tensors."""

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str]) -> None:
        self.images, self.labels, self.classes = images, labels.long(), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index


class BuiltinTasksDataModule(TaskSets):
    """The four built-in tasks and the base's pretext; see the module docstring."""

    stages = ("source", "adapt", "pmq", "merge", "evaluate", "pipeline")
    stages_note = "its experts are merged in float and quantized after merging; no quantize-then-merge or analysis"

    def __init__(self, targets: Sequence[str] = tuple(TASKS), photo_train: int = 134, photo_test: int = 45,
                 eval_batch_size: int = 256, calibration_batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, name: str = "builtin_tasks") -> None:
        tasks = list(targets)
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ConfigError(f"data.targets={tasks} must name built-in tasks, each once, from {list(TASKS)}.")
        for key, value in [("photo_train", photo_train), ("photo_test", photo_test), ("eval_batch_size", eval_batch_size),
                           ("calibration_batch_size", calibration_batch_size)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r} must be a positive integer.")
        self.name, self.seed = name, seed
        self.source, self.targets, self.domains = PRETEXT, tuple(tasks), tuple(tasks)
        self.num_classes: dict[str, int] = {t: TASKS[t] for t in tasks}
        self.classes = {t: ["even", "odd"] if t == "parity" else list(PHOTOS) if t == "photo" else
                        [str(d) for d in range(10)] for t in tasks}
        self.eval_batch_size = eval_batch_size  # training batches are the training plug-ins' (source/adapt.batch_size)
        self.calibration_batch_size, self.num_workers = calibration_batch_size, num_workers
        rng = np.random.default_rng([seed, 7])
        negative = digits_tensors("negative", "train", seed)
        pretext = [("negative_digits", *negative, [str(d) for d in range(10)]),
                   ("photo_rotation", *_rotations(photo_crops(photo_train, "left", rng)[0], rng),
                    ["0", "90", "180", "270"])]
        pooled = torch.cat([images for _, images, _, _ in pretext])
        self.mean, self.std = pooled.mean((0, 2, 3), keepdim=True), pooled.std((0, 2, 3), keepdim=True)
        self._pretext = [(n, TensorItems(self._standardise(x), y, c)) for n, x, y, c in pretext]
        raw: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        for task in tasks:
            for split in SPLITS:
                if task == "photo":
                    part, count = ("left", photo_train) if split == "train" else ("right", photo_test)
                    raw[task, split] = photo_crops(count, part, np.random.default_rng([seed, 11, SPLITS.index(split)]))
                else:
                    images, labels = digits_tensors(_DIGIT_TASKS[task], split, seed)
                    raw[task, split] = (images, labels % 2 if task == "parity" else labels)
        self._sets = {key: TensorItems(self._standardise(x), y, self.classes[key[0]]) for key, (x, y) in raw.items()}

    def _standardise(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def pretext_sets(self) -> list[tuple[str, TensorItems]]:
        """The base's training sets, ``(name, items)``; each has its own classes (``items.classes``)."""
        return list(self._pretext)

    def _check(self, task: str, split: str) -> None:
        if task == PRETEXT:
            raise ConfigError("the pretext has no test split and no head of the network; it trains the base only.")
        super()._check(task, split)

    def _dataset(self, task: str, split: str) -> TensorItems:
        return self._sets[task, split]
