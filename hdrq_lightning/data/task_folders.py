"""Several classification tasks from local image folders: the task-arithmetic setting (one encoder, a head per
task; e.g. CLIP ViT-B/32 on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD), read from disk only.

Layout: ``<root>/<task>/<split>/<class>/<image>`` with splits ``train`` (calibration images) and ``test``
(evaluation); labels index the sorted class folder names of the task, which must be the same in both splits. Each
task has its own classes (``num_classes`` is a ``{task: count}`` mapping, read by the multi-task network's heads).
Layout problems are one paragraph naming the folder, what was found and the fix, raised when the module is built.

The interface is the one the ``pmq`` and ``evaluate`` stages read from a data module: ``source`` (here the name of
the base model, no data), ``targets`` (the tasks, ``data.targets``), ``loader(task, "test")`` and
``calibration_loader(task, size)`` of ``(image, label, index)`` items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision import transforms

from hdrq_lightning.data.datamodule import TaskSets
from hdrq_lightning.data.office_home import IMAGE_SUFFIXES, ImageFolderDomain
from hdrq_lightning.errors import ConfigError, DataError

SPLITS = TaskSets.splits
LAYOUT = "<root>/<task>/{train,test}/<class>/<image>.jpg|png"
# CLIP's normalisation (the encoders of the task-arithmetic setting); ImageNet's for other encoders.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _layout_error(problem: str, fix: str) -> DataError:
    return DataError(f"{problem} Expected the layout {LAYOUT} (data.root, data.targets). {fix}")


def check_task_folder(root: Path, task: str) -> list[str]:
    """The class names of ``task`` (sorted folder names), after checking both splits' layout."""
    folder = root / task
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise _layout_error(f"Task folder {str(folder)!r} is missing (tasks found under {str(root)!r}: "
                            f"{', '.join(found) or 'none'}).", "Point data.root at the folder holding the tasks, "
                            "or list only the tasks it has in data.targets.")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        split_folder = folder / split
        if not split_folder.is_dir():
            raise _layout_error(f"Split folder {str(split_folder)!r} is missing.",
                                f"Each task needs {' and '.join(SPLITS)} folders of class folders.")
        classes[split] = sorted(p.name for p in split_folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes[split]:
            raise _layout_error(f"Split folder {str(split_folder)!r} has no class folders.", "Fill it.")
        for name in classes[split]:
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (split_folder / name).iterdir()):
                raise _layout_error(f"Class folder {str(split_folder / name)!r} holds no .jpg/.jpeg/.png image.",
                                    "Add its images or remove the folder from both splits.")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise _layout_error(f"Task {task!r}: class folders differ between train and test (only in train: "
                            f"{only_train or 'none'}; only in test: {only_test or 'none'}).",
                            "Both splits need the same class folder names, since labels index the sorted names.")
    return classes["train"]


class TaskFoldersDataModule(TaskSets):
    """Tasks of ``<root>/<task>/{train,test}/<class>/<image>``; see the module docstring."""

    stages = ("pmq", "evaluate")
    stages_note = "its models come from files"  # no source/adapt/quantize training

    def __init__(self, root: str | None, targets: Sequence[str], source: str = "base", image_size: int = 224,
                 resize_size: int | None = None, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 eval_batch_size: int = 128, calibration_batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0, max_test_images: int | None = None, name: str = "task_folders") -> None:
        if root is None:
            raise ConfigError("data.root is required: the folder holding one folder per task "
                              f"({LAYOUT}); nothing is downloaded.")
        tasks = list(targets)
        if not tasks:
            raise ConfigError("data.targets is empty; list the task folders under data.root to merge, e.g. "
                              "data.targets=[eurosat,svhn].")
        if len(set(tasks)) != len(tasks) or source in tasks:
            raise ConfigError(f"data.targets={tasks} must name each task once and not the base ({source!r}).")
        for key, value in [("image_size", image_size), ("eval_batch_size", eval_batch_size),
                           ("calibration_batch_size", calibration_batch_size)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r} must be a positive integer.")
        self.name, self.root, self.seed = name, Path(root).expanduser(), seed
        self.source, self.targets, self.domains = source, tuple(tasks), tuple(tasks)
        self.task_classes = {task: check_task_folder(self.root, task) for task in tasks}
        self.num_classes: dict[str, int] = {task: len(names) for task, names in self.task_classes.items()}
        self.classes = self.task_classes  # per task
        self.eval_batch_size, self.calibration_batch_size = eval_batch_size, calibration_batch_size
        self.num_workers, self.max_test_images = num_workers, max_test_images
        self.transform = transforms.Compose([
            transforms.Resize(resize_size or image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size), transforms.ToTensor(), transforms.Normalize(mean, std)])
        self._sets: dict[tuple[str, str], ImageFolderDomain] = {}

    def _dataset(self, task: str, split: str) -> ImageFolderDomain:
        if (task, split) not in self._sets:
            self._sets[task, split] = ImageFolderDomain(self.root / task, split, self.transform, domains=SPLITS)
        return self._sets[task, split]
