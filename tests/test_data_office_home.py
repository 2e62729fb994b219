"""Image-folder domains (Office-Home layout) and the transforms of both datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hdrq_lightning.data.office_home import OFFICE_HOME_DOMAINS, ImageFolderDomain
from hdrq_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from hdrq_lightning.errors import ConfigError, DataError

LAYOUT = "<root>/<domain>/<class>/<image>.jpg"
CLASSES = ("chair", "apple", "bike")  # deliberately unsorted on creation


def _write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """2 domains x 3 classes x 2 small images, plus files that are not images."""
    root = tmp_path / "office_home"
    for domain_id, domain in enumerate(("Art", "Clipart")):
        for class_id, class_name in enumerate(CLASSES):
            colour = (40 * class_id, 100 + 50 * domain_id, 200)
            _write_image(root / domain / class_name / "a.jpg", colour)
            _write_image(root / domain / class_name / "b.PNG", colour)
            (root / domain / class_name / "notes.txt").write_text("not an image")
    return root


def test_labels_follow_sorted_class_folders(tree: Path) -> None:
    dataset = ImageFolderDomain(tree, "Clipart")
    assert dataset.classes == ["apple", "bike", "chair"]
    assert len(dataset) == 6  # two images per class, the .txt files ignored
    for path, label in dataset.samples:
        assert path.suffix.lower() in {".jpg", ".png"}
        assert label == sorted(CLASSES).index(path.parent.name)
    image, label, index = dataset[3]
    assert image.shape == (3, 40, 48) and image.dtype == torch.float32
    assert (label, index) == (dataset.samples[3][1], 3)


def test_image_is_converted_to_rgb(tree: Path) -> None:
    gray = tree / "Art" / "apple" / "gray.jpeg"
    Image.new("L", (20, 20), 128).save(gray)
    dataset = ImageFolderDomain(tree, "Art", transform=build_transforms("office_home", False, 16, 20))
    position = [path for path, _ in dataset.samples].index(gray)
    image, _, _ = dataset[position]
    assert image.shape == (3, 16, 16)


def test_office_home_transforms_sizes(tree: Path) -> None:
    image = Image.open(tree / "Art" / "apple" / "a.jpg")
    for train in (True, False):
        assert build_transforms("office_home", train, 32, 40)(image).shape == (3, 32, 32)
    assert build_transforms("office_home", False)(image).shape == (3, 224, 224)


def test_office_home_eval_transform_normalises_with_imagenet_statistics() -> None:
    colour = (200, 100, 50)
    image = Image.new("RGB", (60, 50), colour)
    tensor = build_transforms("office_home", False, 32, 40)(image)
    expected = [(c / 255.0 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(tensor.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_digits_transforms() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    evaluated = build_transforms("digits", False, 32, 32)(image)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0
    assert torch.allclose(evaluated, expected, atol=1e-6)
    # Training crops a 32x32 window of the 2-pixel padded image: a pure shift, never a flip.
    torch.manual_seed(0)
    train = build_transforms("digits", True, 32, 32)
    padded = torch.nn.functional.pad(expected, (2, 2, 2, 2), value=-1.0)
    windows = [padded[:, r : r + 32, c : c + 32] for r in range(5) for c in range(5)]
    for _ in range(5):
        augmented = train(image)
        assert any(torch.allclose(augmented, window, atol=1e-6) for window in windows)


def test_unknown_transform_dataset() -> None:
    with pytest.raises(ConfigError, match="digits, office_home"):
        build_transforms("imagenet", True, 32, 32)


def _raises_layout_error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        ImageFolderDomain(*args, **kwargs)
    message = str(caught.value)
    assert LAYOUT in message and "\n" not in message
    return message


def test_missing_root(tmp_path: Path) -> None:
    message = _raises_layout_error(tmp_path / "nowhere", "Art")
    assert "domains found there: none" in message


def test_unknown_domain(tree: Path) -> None:
    message = _raises_layout_error(tree, "Sketch")
    assert "Sketch" in message and "Art, Clipart" in message


def test_missing_domain_folder(tree: Path) -> None:
    message = _raises_layout_error(tree, "Product", domains=OFFICE_HOME_DOMAINS)
    assert "Product" in message and "domains found there: Art, Clipart" in message


def test_class_folder_without_images(tree: Path) -> None:
    for domain in ("Art", "Clipart"):
        (tree / domain / "drill").mkdir()
    message = _raises_layout_error(tree, "Art")
    assert "drill" in message


def test_class_folders_differ_between_domains(tree: Path) -> None:
    shutil.rmtree(tree / "Clipart" / "bike")
    _write_image(tree / "Clipart" / "bicycle" / "a.jpg", (1, 2, 3))
    message = _raises_layout_error(tree, "Art", domains=OFFICE_HOME_DOMAINS)
    assert "bike" in message and "bicycle" in message


def test_expected_class_count(tree: Path) -> None:
    message = _raises_layout_error(tree, "Art", expected_classes=65)
    assert "3 class folders, expected 65" in message
