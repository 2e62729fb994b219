"""DomainDataModule: splits, calibration loader, configure() and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hdrq_lightning.data.datamodule import DomainDataModule, EpochSeededSampler
from hdrq_lightning.data.digits import digits_split_indices, render_digits_domain
from hdrq_lightning.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits() -> DomainDataModule:
    return DomainDataModule("digits", batch_size=16, eval_batch_size=64, calibration_size=40,
                            calibration_batch_size=8, seed=0)


def _image_bytes(dataset) -> set[bytes]:
    return {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}


def test_source_val_is_disjoint_from_source_train(digits: DomainDataModule) -> None:
    train, val = digits.dataset("clean", "train"), digits.dataset("clean", "val")
    pool_size = len(digits_split_indices(0)[0])
    assert len(train) + len(val) == pool_size
    assert len(val) == round(0.1 * pool_size)
    assert not _image_bytes(train) & _image_bytes(val)  # compared by pixels, not by index bookkeeping
    assert [val[i][2] for i in range(3)] == [0, 1, 2]  # the index is the position in the split


def test_target_train_is_the_whole_train_pool_and_test_the_test_pool(digits: DomainDataModule) -> None:
    images, labels = render_digits_domain("textured", "train")
    train = digits.dataset("textured", "train")
    assert len(train) == len(labels)
    image, label, _ = train[7]
    assert label == labels[7]
    expected = torch.from_numpy(images[7]).permute(2, 0, 1).float() / 255.0 * 2.0 - 1.0
    assert torch.allclose(image, expected, atol=1e-6)
    assert len(digits.dataset("textured", "test")) == len(digits_split_indices(0)[1])


def test_calibration_loader_is_deterministic_sized_and_unaugmented(digits: DomainDataModule) -> None:
    first = list(digits.calibration_loader("rotated"))
    second = list(digits.calibration_loader("rotated"))
    assert [len(images) for images, _, _ in first] == [8] * 5
    for (images_a, labels_a, _), (images_b, labels_b, _) in zip(first, second):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    # Every calibration image is one of the domain's train images, untouched by augmentation.
    train_images = _image_bytes(digits.dataset("rotated", "train"))
    calibration = torch.cat([images for images, _, _ in first])
    assert all(image.numpy().tobytes() in train_images for image in calibration)
    assert len({image.numpy().tobytes() for image in calibration}) == 40
    other_seed = torch.cat([images for images, _, _ in digits.calibration_loader("rotated", seed=1)])
    assert not torch.equal(calibration, other_seed)
    sized = list(digits.calibration_loader("rotated", size=10, batch_size=4))
    assert [len(images) for images, _, _ in sized] == [4, 4, 2]


def test_calibration_larger_than_split_warns_and_uses_all(digits: DomainDataModule) -> None:
    with pytest.warns(UserWarning, match="using all"):
        loader = digits.calibration_loader("clean", size=100_000, batch_size=512)
    assert sum(len(labels) for _, labels, _ in loader) == len(digits.dataset("clean", "train"))


def test_configure_drives_train_and_val_loaders(digits: DomainDataModule) -> None:
    with pytest.raises(ConfigError, match="configure"):
        DomainDataModule("digits").train_dataloader()
    assert digits.configure(fit=("negative", "train"), evaluate=[("clean", "val"), ("negative", "test")]) is digits
    train_loader = digits.train_dataloader()
    images, labels, index = next(iter(train_loader))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and index.max() < len(train_loader.dataset)
    assert train_loader.drop_last and len(train_loader) == len(train_loader.dataset) // 16
    val_loaders = digits.val_dataloader()
    assert [len(loader.dataset) for loader in val_loaders] == [
        len(digits.dataset("clean", "val")), len(digits.dataset("negative", "test"))]
    assert len(digits.test_dataloader()) == 2


def test_validation_errors(digits: DomainDataModule) -> None:
    with pytest.raises(ConfigError, match="clean, negative, textured, rotated"):
        DomainDataModule("digits", targets=("negative", "mnist_m"))
    with pytest.raises(ConfigError, match="also listed in targets"):
        DomainDataModule("digits", targets=("clean", "rotated"))
    with pytest.raises(ConfigError, match="digits, office_home"):
        DomainDataModule("svhn")
    with pytest.raises(ConfigError, match="data.root"):
        DomainDataModule("office_home", source="Real_World", targets=("Art",))
    with pytest.raises(ConfigError, match="Unknown digits domain"):
        digits.loader("sketch", "test")
    with pytest.raises(ConfigError, match="val split"):
        digits.configure(fit=("clean", "train"), evaluate=[("rotated", "val")])
    with pytest.raises(ConfigError, match="train, val, test"):
        digits.dataset("clean", "holdout")
    with pytest.raises(DataError):
        DomainDataModule("office_home", root="/nonexistent/office_home", source="Art", targets=("Clipart",))


@pytest.fixture
def office_home_root(tmp_path: Path) -> Path:
    for domain in ("Art", "Clipart"):
        for class_id, class_name in enumerate(("mug", "bike", "pen")):
            for i in range(5):
                path = tmp_path / domain / class_name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 20), (50 * class_id, 10 * i, 90)).save(path)
    return tmp_path


@pytest.mark.parametrize("transductive", [True, False])
def test_office_home_splits(office_home_root: Path, transductive: bool) -> None:
    dm = DomainDataModule("office_home", root=str(office_home_root), source="Art", targets=("Clipart",),
                          image_size=16, resize_size=20, transductive=transductive, batch_size=4)
    assert dm.num_classes == 3 and dm.classes == ["bike", "mug", "pen"] and dm.domains == ("Art", "Clipart")
    train, test = dm.dataset("Clipart", "train"), dm.dataset("Clipart", "test")
    assert train[0][0].shape == (3, 16, 16)
    train_indices, test_indices = set(train.indices.tolist()), set(test.indices.tolist())
    if transductive:
        assert train_indices == test_indices == set(range(15))
    else:
        assert len(test_indices) == 3 and not train_indices & test_indices
        assert train_indices | test_indices == set(range(15))
    source_train, source_val = dm.dataset("Art", "train"), dm.dataset("Art", "val")
    assert not set(source_train.indices.tolist()) & set(source_val.indices.tolist())
    assert len(source_val) >= 1
    assert np.array_equal(dm.dataset("Art", "train", augment=True).indices, source_train.indices)


def test_epoch_seeded_sampler_is_a_function_of_seed_and_epoch() -> None:
    """Each epoch's order (and the global RNG that draws its augmentations) depends on (seed, epoch) only, not on
    what the process drew before: a resumed run's epoch sees the data of the uninterrupted run's epoch."""
    epoch = {"value": 3}
    sampler = EpochSeededSampler(50, seed=7, epoch=lambda: epoch["value"])
    first = list(sampler)
    after_first = torch.rand(4)
    torch.manual_seed(12345)  # another process history
    torch.rand(100)
    again = list(sampler)
    assert first == again and sorted(first) == list(range(50))
    assert torch.equal(torch.rand(4), after_first)  # the augmentation draws too
    epoch["value"] = 4
    assert list(sampler) != first
    assert list(EpochSeededSampler(50, seed=8, epoch=lambda: 3)) != first
