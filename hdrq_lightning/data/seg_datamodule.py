"""Segmentation domains as a data plug-in (``conf/data/streets.yaml``, ``conf/data/gta_cs_idd.yaml``).

One interface for the built-in ``streets`` benchmark and the real GTA5 -> Cityscapes / IDD layouts: the stages
and the evaluation ask for ``loader(domain, "test")`` (whole images through the test pipeline, labels at their own
size), ``calibration_loader(domain, size)`` (seeded target-train crops, unlabeled) and the training streams
``step_loader({name: (domain, labels)}, iterations)`` (random crops and flips; a target stream never carries labels),
whose batch for step t is a function of (seed, t) alone, so a resumed run sees the data of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hdrq_lightning.data.datamodule import _domain_rng
from hdrq_lightning.data.joint_transforms import JointTransform, RandomCrop, RandomFlip, Resize, to_tensors
from hdrq_lightning.data.segmentation import CITYSCAPES_CLASSES, SegmentationDataset, check_layout
from hdrq_lightning.data.streets import STREETS_CLASSES, STREETS_DOMAINS, render_streets
from hdrq_lightning.errors import ConfigError

_CALIBRATION_SALT = 11
REAL_DOMAINS = {"gta5": ("gta5", {"train": "train"}), "cityscapes": ("cityscapes", {"train": "train", "test": "val"}),
                "idd": ("idd", {"train": "train", "test": "val"})}


class StreetsDomain(Dataset):
    """One split of a streets domain through a joint transform; ``with_labels=False`` serves valid masks."""

    def __init__(self, domain: str, split: str, transform: Callable | None, with_labels: bool, seed: int,
                 cache_dir: str | None) -> None:
        self.images, self.labels = render_streets(domain, split, seed, cache_dir)
        self.transform, self.with_labels = transform, with_labels

    def __len__(self) -> int:
        return len(self.images)

    def class_count_array(self) -> np.ndarray:
        """[images, classes] pixel counts of the labels (rare class sampling)."""
        classes = len(STREETS_CLASSES)
        return np.stack([np.bincount(label.reshape(-1), minlength=256)[:classes] for label in self.labels])

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        label = Image.fromarray(self.labels[index]) if self.with_labels else None
        tensor, second = (self.transform or to_tensors)(image, label)
        return tensor, second, index


@contextmanager
def torch_seeded(seed: int):
    """Torch's global generator seeded with ``seed`` inside (the joint transforms draw from it), restored after."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def step_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(salt) * 104_729 + 13) % 2**63


class RareClassSampler:
    """Rare class sampling (DAFormer / HRDA): a class c with probability softmax((1 - f_c) / temperature) over the
    source's class pixel frequencies f, then uniformly one of the images holding more than ``min_pixels`` pixels of
    c. ``counts``: [images, classes] pixel counts (the converted labels' statistics)."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if temperature <= 0 or min_pixels < 0:
            raise ConfigError(f"rare class sampling needs temperature > 0 and min_pixels >= 0, got {temperature} "
                              f"and {min_pixels}.")
        frequency = counts.sum(0) / max(counts.sum(), 1.0)
        self.images = {c: np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])}
        classes = [c for c, members in self.images.items() if len(members)]
        if not classes:
            raise ConfigError(f"rare class sampling: no image holds more than {min_pixels} pixels of any class; "
                              "lower adapt.rare_class_sampling.min_pixels.")
        logits = (1 - frequency[classes]) / temperature
        weights = np.exp(logits - logits.max())
        self.classes = np.asarray(classes)
        self.probabilities = weights / weights.sum()

    def sample(self, generator: torch.Generator) -> tuple[int, int]:
        """(class, image index)."""
        c = int(self.classes[int(torch.multinomial(torch.from_numpy(self.probabilities), 1, generator=generator))])
        members = self.images[c]
        return c, int(members[int(torch.randint(0, len(members), (), generator=generator))])


class StepBatches(IterableDataset):
    """Training batches indexed by step: batch ``t`` draws its images of each stream and their crops and flips
    from (seed, t) alone, so any step's data is known without the ones before it. Iteration starts at ``start()``
    (read when iteration begins: a resumed run's restored step) and runs until ``iterations``; with worker
    processes, worker w yields steps start + w, start + w + W, ... (DataLoader interleaves them back in order).
    An iterable without a length, so Lightning does not try to replay a resumed epoch's position itself.
    Items are dicts {stream: (images, labels or valid masks, indices)}."""

    def __init__(self, streams: dict[str, Dataset], batch_size: int, iterations: int, start: Callable[[], int],
                 seed: int, rare_classes: dict[str, tuple[RareClassSampler, float]] | None = None) -> None:
        self.streams, self.batch_size = streams, batch_size
        self.iterations, self.start, self.seed = iterations, start, seed
        self.rare_classes = rare_classes or {}

    def _items(self, name: str, dataset: Dataset, generator: torch.Generator) -> tuple[list, torch.Tensor]:
        if name not in self.rare_classes:
            indices = torch.randint(0, len(dataset), (self.batch_size,), generator=generator)
            return [dataset[int(i)] for i in indices], indices
        sampler, min_crop_pixels = self.rare_classes[name]
        items, indices = [], []
        for _ in range(self.batch_size):
            c, index = sampler.sample(generator)
            for _attempt in range(10):  # re-crop until the crop holds enough of the sampled class
                item = dataset[index]
                if int((item[1] == c).sum()) > min_crop_pixels:
                    break
            items.append(item)
            indices.append(index)
        return items, torch.tensor(indices)

    def batch(self, step: int) -> dict:
        out = {}
        for salt, (name, dataset) in enumerate(self.streams.items()):
            generator = torch.Generator().manual_seed(step_seed(self.seed, step, salt))
            with torch_seeded(step_seed(self.seed, step, salt + 100)):  # the transforms' crops and flips
                items, indices = self._items(name, dataset, generator)
            out[name] = (torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items]), indices)
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(int(self.start()) + worker, self.iterations, workers):
            yield self.batch(step)


class SegmentationDataModule(L.LightningDataModule):
    """Source and target domains of ``streets`` or of the real data sets (``name=gta_cs_idd``)."""

    def __init__(self, name: str, source: str, targets: Sequence[str], num_classes: int, root: str | None = None,
                 cache_dir: str | None = None, seed: int = 0, batch_size: int = 8, eval_batch_size: int = 16,
                 num_workers: int = 0, crop_size: Sequence[int] = (64, 64), train_scale: Sequence[int] | None = None,
                 test_scale: Sequence[int] | None = None, cat_max_ratio: float | None = None,
                 calibration_size: int = 32, calibration_batch_size: int = 16,
                 mean: Sequence[float] | None = (0.485, 0.456, 0.406),
                 std: Sequence[float] | None = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        if name == "streets":
            domains, classes = STREETS_DOMAINS, STREETS_CLASSES
        elif name == "gta_cs_idd":
            domains, classes = tuple(REAL_DOMAINS), CITYSCAPES_CLASSES
            if not root:
                raise ConfigError("data.root must point at the folder holding GTA5/, Cityscapes/ and IDD_Segmentation/ "
                                  "(paths.data_dir or HDRQ_DATA_DIR).")
        else:
            raise ConfigError(f"segmentation data set {name!r} is unknown; use streets or gta_cs_idd.")
        for domain in (source, *targets):
            if domain not in domains:
                raise ConfigError(f"domain {domain!r} is not one of {name}'s domains {list(domains)}.")
        if source in targets or not targets:
            raise ConfigError(f"data.targets {list(targets)} must be non-empty and must not contain the source.")
        if num_classes != len(classes):
            raise ConfigError(f"data.num_classes={num_classes} but {name} has {len(classes)} classes.")
        self.name, self.source, self.targets = name, source, list(targets)
        self.num_classes, self.classes = num_classes, list(classes)
        self.root, self.seed = root, int(seed)
        self.cache_dir = cache_dir
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.crop_size = tuple(crop_size)
        self.train_scale = None if train_scale is None else tuple(train_scale)
        self.test_scale = None if test_scale is None else tuple(test_scale)
        self.cat_max_ratio, self.calibration_size = cat_max_ratio, calibration_size
        self.calibration_batch_size = calibration_batch_size
        self.mean, self.std = mean, std
        if name == "gta_cs_idd":  # a missing root or split is reported before anything runs
            for domain in (source, *targets):
                kind, splits = REAL_DOMAINS[domain]
                for split in splits.values():
                    check_layout(kind, root, split)

    def has_split(self, domain: str, split: str) -> bool:
        return self.name == "streets" or split in REAL_DOMAINS[domain][1]

    # -- datasets ----------------------------------------------------------------------------------------------
    def _transform(self, train: bool, labeled: bool) -> JointTransform:
        ops = []
        if train:
            if self.train_scale is not None:
                ops.append(Resize(self.train_scale))
            ops += [RandomCrop(self.crop_size, self.cat_max_ratio if labeled else None), RandomFlip(0.5)]
        elif self.test_scale is not None:
            ops.append(Resize(self.test_scale, resize_label=False))
        return JointTransform(ops, self.mean, self.std)

    def dataset(self, domain: str, split: str, train: bool = False, labels: bool = True) -> Dataset:
        transform = self._transform(train, labels)
        if self.name == "streets":
            return StreetsDomain(domain, split, transform, labels, self.seed, self.cache_dir)
        kind, splits = REAL_DOMAINS[domain]
        if split not in splits:
            raise ConfigError(f"{domain} has no {split!r} split here; it has {list(splits)}.")
        cache = Path(self.cache_dir or Path(self.root) / ".hdrq_cache")
        return SegmentationDataset(kind, self.root, splits[split], cache, transform, with_labels=labels)

    # -- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, sampler=None, drop_last: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def loader(self, domain: str, split: str = "test", batch_size: int | None = None) -> DataLoader:
        """Whole images of (domain, split) through the test pipeline, labelled, in order."""
        return self._loader(self.dataset(domain, split), batch_size or self.eval_batch_size)

    def step_loader(self, streams: dict[str, tuple[str, bool]], iterations: int, start: Callable[[], int] = lambda: 0,
                    batch_size: int | None = None, rare_classes: dict[str, dict] | None = None) -> DataLoader:
        """Batches for steps ``start() .. iterations - 1`` of named streams {name: (domain, with labels)}: a
        target stream never carries labels (``StepBatches``). ``rare_classes``: {labelled stream: {temperature,
        min_pixels, crop_ratio}} turns on rare class sampling for it."""
        datasets = {name: self.dataset(domain, "train", train=True, labels=labels)
                    for name, (domain, labels) in streams.items()}
        samplers = {}
        for name, settings in (rare_classes or {}).items():
            counts = datasets[name].class_count_array()
            sampler = RareClassSampler(counts, settings.get("temperature", 0.01), settings.get("min_pixels", 3000))
            samplers[name] = (sampler, settings.get("min_pixels", 3000) * settings.get("crop_ratio", 2.0))
        return DataLoader(StepBatches(datasets, batch_size or self.batch_size, iterations, start, self.seed, samplers),
                          batch_size=None, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def calibration_loader(self, domain: str, size: int | None = None, batch_size: int | None = None,
                           seed: int | None = None) -> DataLoader:
        """``size`` seeded target-train crops (the train pipeline: crop and flip, drawn from a fixed generator),
        unlabeled, in a fixed order: the reconstruction's and GPTQ's calibration data."""
        size = self.calibration_size if size is None else size
        dataset = self.dataset(domain, "train", train=True, labels=False)
        rng = _domain_rng(self.seed if seed is None else seed, _CALIBRATION_SALT, domain)
        chosen = rng.permutation(len(dataset))[:size]
        with torch_seeded(int(rng.integers(0, 2**31))):  # materialised now: the crops do not depend on when or
            items = [dataset[int(i)] for i in chosen]         # how often the loader is iterated
        images = torch.stack([item[0] for item in items])
        masks = torch.stack([item[1] for item in items])
        tensors = torch.utils.data.TensorDataset(images, masks, torch.arange(len(items)))
        return DataLoader(tensors, batch_size=batch_size or self.calibration_batch_size, shuffle=False)
