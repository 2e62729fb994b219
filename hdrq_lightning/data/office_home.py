"""Image-folder domains (``<root>/<domain>/<class>/<image>``), with Office-Home as the main user.

Labels are the index of the class folder in the sorted list of class folder names, the same in
every domain (as SHOT's file lists), so a model trained on one domain reads labels of another.
Layout problems are reported up front, naming the expected layout and the domains that were found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from hdrq_lightning.errors import DataError

OFFICE_HOME_DOMAINS: tuple[str, ...] = ("Art", "Clipart", "Product", "Real_World")
OFFICE_HOME_NUM_CLASSES = 65
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
EXPECTED_LAYOUT = "<root>/<domain>/<class>/<image>.jpg"


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _layout_error(root: Path, problem: str, fix: str) -> DataError:
    """A one-paragraph DataError: what is wrong, the expected layout, the domains found, the fix."""
    found = [path.name for path in _visible_subfolders(root)] if root.is_dir() else []
    return DataError(
        f"{problem} Expected the layout {EXPECTED_LAYOUT} under root {str(root)!r}; "
        f"domains found there: {', '.join(found) if found else 'none'}. {fix} (The root is data.root; by default "
        f"$HDRQ_DATA_DIR/OfficeHome, with HDRQ_DATA_DIR defaulting to ./data.)"
    )


def _class_names(root: Path, domain: str) -> list[str]:
    return [path.name for path in _visible_subfolders(root / domain)]


class ImageFolderDomain(Dataset):
    """All images of one domain of a ``<root>/<domain>/<class>/<image>`` tree; items are (image, label, index).

    ``domains`` lists the valid domain names (default: the folders found under ``root``); the class
    folders are checked against ``expected_classes`` and against every other domain folder present.
    ``transform`` receives an RGB PIL image; without one the image is a float CxHxW tensor in [0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        domain: str,
        transform: Callable[[Image.Image], Tensor] | None = None,
        domains: Sequence[str] | None = None,
        expected_classes: int | None = None,
    ) -> None:
        self.root, self.domain, self.transform = Path(root).expanduser(), domain, transform
        self._check_domain(domains)
        self.classes: list[str] = _class_names(self.root, domain)
        self._check_classes(domains, expected_classes)
        self.samples: list[tuple[Path, int]] = []
        for label, class_name in enumerate(self.classes):
            images = _image_files(self.root / domain / class_name)
            if not images:
                raise _layout_error(
                    self.root,
                    f"Class folder {str(self.root / domain / class_name)!r} holds no .jpg/.jpeg/.png image.",
                    "Add its images or remove the empty folder from every domain.",
                )
            self.samples.extend((path, label) for path in images)

    def _check_domain(self, domains: Sequence[str] | None) -> None:
        if not self.root.is_dir():
            raise _layout_error(self.root, f"Data root {str(self.root)!r} is not an existing folder.", "Point root at the data set.")
        valid = list(domains) if domains is not None else [p.name for p in _visible_subfolders(self.root)]
        if self.domain not in valid:
            raise _layout_error(
                self.root,
                f"Unknown domain {self.domain!r}; valid domains are {', '.join(valid) or 'none'}.",
                "Pick one of the valid domains.",
            )
        if not (self.root / self.domain).is_dir():
            raise _layout_error(
                self.root,
                f"Domain folder {str(self.root / self.domain)!r} is missing.",
                "Extract the data set so that each domain is a folder under root.",
            )

    def _check_classes(self, domains: Sequence[str] | None, expected_classes: int | None) -> None:
        if not self.classes:
            raise _layout_error(
                self.root, f"Domain folder {str(self.root / self.domain)!r} has no class folders.", "Fill it."
            )
        if expected_classes is not None and len(self.classes) != expected_classes:
            raise _layout_error(
                self.root,
                f"Domain {self.domain!r} has {len(self.classes)} class folders, expected {expected_classes}.",
                "Check that the data set was extracted completely.",
            )
        others = list(domains) if domains is not None else [p.name for p in _visible_subfolders(self.root)]
        for other in others:
            if other == self.domain or not (self.root / other).is_dir():
                continue
            other_classes = _class_names(self.root, other)
            if other_classes != self.classes:
                only_here = sorted(set(self.classes) - set(other_classes))
                only_there = sorted(set(other_classes) - set(self.classes))
                raise _layout_error(
                    self.root,
                    f"Class folders differ between domains {self.domain!r} and {other!r} "
                    f"(only in {self.domain!r}: {only_here or 'none'}; only in {other!r}: {only_there or 'none'}).",
                    "Every domain needs the same class folder names, since labels index the sorted names.",
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        if self.transform is None:
            tensor = pil_to_tensor(image).to(torch.float32) / 255.0
        else:
            tensor = self.transform(image)
        return tensor, label, index
