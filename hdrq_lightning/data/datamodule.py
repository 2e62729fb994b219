"""One LightningDataModule for every stage: named (domain, split) datasets, loaders and calibration sets.

Stages ask for data by name (``dm.loader("Art", "test")``, ``dm.calibration_loader("Art")``) and pick
what ``trainer.fit`` sees with :meth:`DomainDataModule.configure`. Items are always
``(image float CxHxW, label, index)`` where ``index`` is the position in the requested dataset, so
per-sample tables (SHOT's pseudo labels) built from one loader index batches of another loader over
the same (domain, split), augmented or not.
"""

from __future__ import annotations

import copy
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hdrq_lightning.data.digits import DIGITS_DOMAINS, DIGITS_NUM_CLASSES, DigitsDomain, digits_split_indices
from hdrq_lightning.data.office_home import OFFICE_HOME_DOMAINS, ImageFolderDomain
from hdrq_lightning.data.transforms import build_transforms
from hdrq_lightning.errors import ConfigError

DATASET_DOMAINS: dict[str, tuple[str, ...]] = {"digits": DIGITS_DOMAINS, "office_home": OFFICE_HOME_DOMAINS}
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Office-Home has no official split: without transduction a seeded 20% of each domain is the test split.
OFFICE_HOME_TEST_FRACTION = 0.2
# Salts keep the seeded permutations of the different splits independent of each other.
_SPLIT_SALT, _VAL_SALT, _CALIBRATION_SALT = 1, 2, 3


def _domain_rng(seed: int, salt: int, domain: str) -> np.random.Generator:
    return np.random.default_rng([seed, salt, zlib.crc32(domain.encode())])


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"data.{name} must be a positive integer, got {value}.")


class IndexedSubset(Dataset):
    """Selected items of a dataset; the returned index is the position in this subset."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int, int]:
        image, label, _ = self.dataset[int(self.indices[position])]
        return image, label, position


class TaskSets:
    """Loaders of a multi-task data module (task folders, the built-in tasks): what the pmq and evaluate stages and
    the task training plug-ins read. Each task has ``train`` and ``test`` splits of ``(image, label, index)`` items;
    subclasses set ``targets``, ``seed``, ``eval_batch_size``, ``calibration_batch_size``, ``num_workers``,
    ``max_test_images`` and implement ``_dataset(task, split)``."""

    splits: tuple[str, ...] = ("train", "test")
    max_test_images: int | None = None

    def _dataset(self, task: str, split: str) -> Dataset:
        raise NotImplementedError

    def _check(self, task: str, split: str) -> None:
        if task not in self.targets:
            raise ConfigError(f"Task {task!r} is not in data.targets ({', '.join(self.targets)}).")
        if split not in self.splits:
            raise ConfigError(f"Unknown split {split!r}; tasks have {', '.join(self.splits)}.")

    def dataset(self, task: str, split: str) -> Dataset:
        self._check(task, split)
        return self._dataset(task, split)

    def has_split(self, domain: str, split: str) -> bool:
        return domain in self.targets and split in self.splits

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def loader(self, task: str, split: str, batch_size: int | None = None, shuffle: bool = False,
               **_: object) -> DataLoader:
        """A task's split in its own order; test: the first ``max_test_images`` of a seeded permutation (kept in
        order) when set, a quick look at a large test set."""
        dataset = self.dataset(task, split)
        if split == "test" and self.max_test_images is not None and self.max_test_images < len(dataset):
            permutation = _domain_rng(self.seed, _SPLIT_SALT, task).permutation(len(dataset))
            dataset = IndexedSubset(dataset, np.sort(permutation[:self.max_test_images]))
        return self._loader(dataset, batch_size or self.eval_batch_size, shuffle)

    def calibration_loader(self, task: str, size: int, batch_size: int | None = None, **_: object) -> DataLoader:
        """The first ``size`` images of a seeded permutation of the task's train split, in that order."""
        train = self.dataset(task, "train")
        if size > len(train):
            warnings.warn(f"Calibration size {size} exceeds the {len(train)} train images of {task!r}; using all "
                          "of them.", stacklevel=2)
        chosen = _domain_rng(self.seed, _CALIBRATION_SALT, task).permutation(len(train))[:size]
        return self._loader(IndexedSubset(train, chosen), batch_size or self.calibration_batch_size)


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose epoch's order and augmentation draws are functions of (seed, epoch) alone.

    Lightning restores a resumed run's model, optimizer and loop state but not the global RNG, which draws the
    default sampler's permutation and the train transforms' random crops and flips: a resumed epoch would then
    see other data than the uninterrupted one. Here each epoch's permutation comes from its own generator and the
    global RNG is reseeded from (seed, epoch) when the epoch's first index is drawn, so with ``num_workers=0`` the
    augmentations (drawn in this process, in index order) are those of the uninterrupted run too. ``epoch`` reads
    the current epoch when iteration starts (the trainer's, restored before a resumed run's first batch).
    """

    def __init__(self, size: int, seed: int, epoch: Callable[[], int] | None = None) -> None:
        self.size, self.seed, self.epoch = size, int(seed), epoch
        self._calls = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch() if self.epoch is not None else self._calls
        self._calls += 1
        epoch_seed = (self.seed * 1_000_003 + int(epoch) * 7_919 + 17) % 2**63
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        torch.manual_seed(epoch_seed)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        yield from order


class DomainDataModule(L.LightningDataModule):
    """Source and target domains of one dataset (``digits`` or ``office_home``).

    Source ``train`` excludes a seeded ``val_fraction`` held out as ``val`` (SHOT's model selection).
    Digits use their shared held-out test pool. Office-Home has no official split: ``train`` is every
    image and, when ``transductive`` (SHOT), so is ``test``; otherwise a seeded 80/20 split of each
    domain gives disjoint ``train`` and ``test``. ``root`` and ``transductive`` are ignored for digits.
    """

    def __init__(
        self,
        name: str,
        root: str | None = None,
        source: str = "clean",
        targets: Sequence[str] = ("negative", "textured", "rotated"),
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        image_size: int = 32,
        resize_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.1,
        transductive: bool = False,
        calibration_size: int = 1024,
        calibration_batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if name not in DATASET_DOMAINS:
            raise ConfigError(f"Unknown dataset {name!r}; set data.name to one of {', '.join(DATASET_DOMAINS)}.")
        self.name, self.seed, self.transductive = name, seed, transductive
        self.valid_domains = DATASET_DOMAINS[name]
        self.source, self.targets = source, tuple(targets)
        for domain in (source, *self.targets):
            self._check_domain(domain)
        if source in self.targets:
            raise ConfigError(f"Source domain {source!r} is also listed in targets; remove it from data.targets.")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"data.targets lists a domain twice ({', '.join(self.targets)}); list each once.")
        self.domains: tuple[str, ...] = (source, *self.targets)
        for key, value in [("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("calibration_size", calibration_size), ("calibration_batch_size", calibration_batch_size)]:
            _positive(key, value)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        # more loader processes than cores only adds switching (and a warning from torch): cap at the core count
        num_workers = min(num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_fraction = val_fraction
        self.calibration_size, self.calibration_batch_size = calibration_size, calibration_batch_size
        self.train_transform = build_transforms(name, True, image_size, resize_size)
        self.eval_transform = build_transforms(name, False, image_size, resize_size)
        self.root: Path | None = None
        self._folders: dict[str, ImageFolderDomain] = {}
        if name == "office_home":
            if root is None:
                raise ConfigError(
                    "data.root is required for office_home; set it to the folder holding "
                    f"{', '.join(OFFICE_HOME_DOMAINS)} (each <domain>/<class>/<image>.jpg)."
                )
            self.root = Path(root)
            # Scan every domain now, so a layout problem stops the run before any training.
            self._folders = {domain: ImageFolderDomain(self.root, domain, domains=OFFICE_HOME_DOMAINS)
                             for domain in self.domains}
        self.classes: list[str] = (
            [str(digit) for digit in range(DIGITS_NUM_CLASSES)] if name == "digits"
            else self._folders[source].classes
        )
        self.num_classes: int = len(self.classes)
        self._datasets: dict[tuple[str, str, bool], IndexedSubset] = {}
        self._fit: tuple[str, str] | None = None
        self._evaluate: list[tuple[str, str]] = []

    def _check_domain(self, domain: str) -> None:
        if domain not in self.valid_domains:
            raise ConfigError(
                f"Unknown {self.name} domain {domain!r}; choose one of {', '.join(self.valid_domains)}."
            )

    def _check(self, domain: str, split: str) -> None:
        self._check_domain(domain)
        if domain not in self.domains:
            raise ConfigError(
                f"Domain {domain!r} is neither the source nor a target ({', '.join(self.domains)}); "
                "add it to data.targets."
            )
        if split not in SPLITS:
            raise ConfigError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        if split == "val" and domain != self.source:
            raise ConfigError(f"Only the source domain {self.source!r} has a val split, not {domain!r}.")
        if split == "val" and self.val_fraction == 0.0:
            raise ConfigError("The source val split is empty because data.val_fraction is 0; set it > 0.")

    def _base(self, domain: str, pool: str, augment: bool) -> Dataset:
        """The whole train/test pool of a digits domain, or the whole Office-Home domain."""
        transform = self.train_transform if augment else self.eval_transform
        if self.name == "digits":
            return DigitsDomain(domain, pool, transform, seed=self.seed)
        view = copy.copy(self._folders[domain])
        view.transform = transform
        return view

    def _pool_indices(self, domain: str, pool: str) -> np.ndarray:
        """Indices of the train or test pool inside :meth:`_base` of ``domain``."""
        if self.name == "digits":
            train_pool, test_pool = digits_split_indices(self.seed)
            return np.arange(len(test_pool if pool == "test" else train_pool))
        count = len(self._folders[domain])
        if self.transductive:
            return np.arange(count)
        permutation = _domain_rng(self.seed, _SPLIT_SALT, domain).permutation(count)
        test_count = round(count * OFFICE_HOME_TEST_FRACTION)
        return np.sort(permutation[:test_count] if pool == "test" else permutation[test_count:])

    def _split_indices(self, domain: str, split: str) -> np.ndarray:
        if split == "test":
            return self._pool_indices(domain, "test")
        train_pool = self._pool_indices(domain, "train")
        if domain != self.source:
            return train_pool
        val_count = round(len(train_pool) * self.val_fraction)
        if self.val_fraction > 0:
            val_count = max(val_count, 1)
        permutation = _domain_rng(self.seed, _VAL_SALT, domain).permutation(len(train_pool))
        chosen = permutation[:val_count] if split == "val" else permutation[val_count:]
        return train_pool[np.sort(chosen)]

    def dataset(self, domain: str, split: str, augment: bool = False) -> Dataset:
        """(domain, split) with train-time augmentation or with the deterministic eval transform."""
        self._check(domain, split)
        key = (domain, split, augment)
        if key not in self._datasets:
            pool = "test" if split == "test" else "train"
            self._datasets[key] = IndexedSubset(self._base(domain, pool, augment), self._split_indices(domain, split))
        return self._datasets[key]

    def _make_loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def loader(self, domain: str, split: str, augment: bool = False, shuffle: bool = False,
               batch_size: int | None = None, drop_last: bool = False) -> DataLoader:
        """Loader of (domain, split); batch size defaults to batch_size when shuffling, else eval_batch_size."""
        default = self.batch_size if shuffle else self.eval_batch_size
        return self._make_loader(self.dataset(domain, split, augment), batch_size or default, shuffle, drop_last)

    def calibration_loader(self, domain: str, size: int | None = None, batch_size: int | None = None,
                           seed: int | None = None) -> DataLoader:
        """The first ``size`` images of a seeded permutation of the train split, unaugmented, fixed order."""
        size = self.calibration_size if size is None else size
        _positive("calibration size", size)
        train = self.dataset(domain, "train", augment=False)
        if size > len(train):
            warnings.warn(
                f"Calibration size {size} exceeds the {len(train)} train images of {domain!r}; using all of them.",
                stacklevel=2,
            )
        seed = self.seed if seed is None else seed
        chosen = _domain_rng(seed, _CALIBRATION_SALT, domain).permutation(len(train))[:size]
        return self._make_loader(IndexedSubset(train, chosen), batch_size or self.calibration_batch_size,
                                 shuffle=False, drop_last=False)

    def configure(self, fit: tuple[str, str] | None,
                  evaluate: Sequence[tuple[str, str]] = ()) -> DomainDataModule:
        """Choose what train_dataloader (augmented, shuffled) and val/test_dataloader serve."""
        for domain, split in ([fit] if fit is not None else []) + list(evaluate):
            self._check(domain, split)
        self._fit = None if fit is None else (fit[0], fit[1])
        self._evaluate = [(domain, split) for domain, split in evaluate]
        return self

    def train_dataloader(self) -> DataLoader:
        if self._fit is None:
            raise ConfigError("No training data chosen; call datamodule.configure(fit=(domain, split)) first.")
        dataset = self.dataset(*self._fit, augment=True)
        trainer = getattr(self, "trainer", None)
        sampler = EpochSeededSampler(len(dataset), self.seed,
                                     epoch=(lambda: trainer.current_epoch) if trainer is not None else None)
        # Dropping the last partial batch keeps BatchNorm statistics sane, unless it is the only batch.
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=len(dataset) >= self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self.loader(domain, split) for domain, split in self._evaluate]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.loader(domain, split) for domain, split in self._evaluate]
