"""GTA5 / Cityscapes / IDD loaders on tiny fixture trees written here; joint transforms keep image and label
aligned; unlabeled (target) items never read labels."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hdrq_lightning.data.joint_transforms import (
    JointTransform,
    RandomCrop,
    RandomFlip,
    Resize,
    fit_size,
    rescale_logits,
)
from hdrq_lightning.data.segmentation import (
    ID_TO_TRAIN_ID,
    SegmentationDataset,
    list_samples,
    prepare_labels,
    rasterize_idd_polygons,
)
from hdrq_lightning.errors import ConfigError, DataError

IDS = np.array([[7, 8, 11, 26], [24, 23, 0, 255], [33, 21, 13, 1]], dtype=np.uint8)  # 3x4 label ids
TRAIN_IDS = np.array([[0, 1, 2, 13], [11, 10, 255, 255], [18, 8, 4, 255]], dtype=np.uint8)


def _image(path, width=4, height=3, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, fmt)


def _gta(root):
    for name in ("00001", "00002"):
        _image(root / "GTA5" / "images" / f"{name}.png")
        (root / "GTA5" / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(IDS).save(root / "GTA5" / "labels" / f"{name}.png")


def _cityscapes(root):
    for split in ("train", "val"):
        for city in ("aachen", "bremen"):
            stem = f"{city}_000000_000019"
            _image(root / "Cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label = root / "Cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(IDS).save(label)


IDD_RECORD = {"imgHeight": 6, "imgWidth": 8, "objects": [
    {"label": "road", "polygon": [[0, 3], [7, 3], [7, 5], [0, 5]]},
    {"label": "cargroup", "polygon": [[1, 3], [3, 3], [3, 4], [1, 4]]},  # on top of the road, "group" dropped
    {"label": "sky", "polygon": [[0, 0], [7, 0], [7, 1], [0, 1]], "deleted": 1},  # deleted: not drawn
    {"label": "pole", "polygon": [[5, 0], [5, 2]]},  # two points: skipped
    {"label": "unheard-of", "polygon": [[6, 0], [7, 0], [7, 1], [6, 1]]},  # unknown name: 255
]}


def _idd(root):
    stem = "frame0001"
    _image(root / "IDD_Segmentation" / "leftImg8bit" / "train" / "201" / f"{stem}_leftImg8bit.jpg", 8, 6, "JPEG")
    label = root / "IDD_Segmentation" / "gtFine" / "train" / "201" / f"{stem}_gtFine_polygons.json"
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(json.dumps(IDD_RECORD))


def test_label_tables_convert_ids_to_train_ids():
    assert np.array_equal(ID_TO_TRAIN_ID[IDS], TRAIN_IDS)


@pytest.mark.parametrize("dataset, make, split", [("gta5", _gta, "train"), ("cityscapes", _cityscapes, "val")])
def test_gta_and_cityscapes_layouts_convert_and_cache_once(tmp_path, dataset, make, split):
    make(tmp_path / "data")
    cache = tmp_path / "cache"
    data = SegmentationDataset(dataset, tmp_path / "data", split, cache)
    assert len(data) == 2
    image, label, index = data[0]
    assert image.shape == (3, 3, 4) and label.dtype == torch.int64 and index == 0
    assert np.array_equal(label.numpy(), TRAIN_IDS)
    expected = np.bincount(TRAIN_IDS[TRAIN_IDS != 255], minlength=19).tolist()
    assert all(counts == expected for counts in data.class_counts.values())
    stats = cache / dataset / split / "class_stats.json"
    written = {p: p.stat().st_mtime_ns for p in stats.parent.iterdir()}
    SegmentationDataset(dataset, tmp_path / "data", split, cache)  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stats.parent.iterdir()} == written


def test_idd_polygons_are_rasterised_to_train_ids(tmp_path):
    unknown: set[str] = set()
    ids = rasterize_idd_polygons(IDD_RECORD, unknown)
    assert ids.shape == (6, 8) and unknown == {"unheard-of"}
    assert ids[4, 5] == 0 and ids[3, 2] == 13  # road, and the car drawn over it
    assert ids[0, 3] == 255 and ids[1, 5] == 255  # deleted sky and the two-point pole are not drawn
    _idd(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = SegmentationDataset("idd", tmp_path / "data", "train", tmp_path / "cache")
    assert any("unheard-of" in str(w.message) for w in caught)
    assert np.array_equal(data[0][1].numpy(), ids)


def test_parallel_conversion_equals_serial(tmp_path):
    root = tmp_path / "data"
    for i in range(20):
        _image(root / "GTA5" / "images" / f"{i:05d}.png")
        (root / "GTA5" / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(IDS, i, axis=1)).save(root / "GTA5" / "labels" / f"{i:05d}.png")
    samples = list_samples("gta5", root, "train")
    serial = prepare_labels("gta5", samples, "train", tmp_path / "serial", workers=1)
    parallel = prepare_labels("gta5", samples, "train", tmp_path / "parallel", workers=2)
    assert serial == parallel
    for sample in samples:
        name = f"{sample.key}.png"
        assert (tmp_path / "serial" / "gta5" / "train" / name).read_bytes() == \
            (tmp_path / "parallel" / "gta5" / "train" / name).read_bytes()


@pytest.mark.parametrize("problem, match", [
    ("no_root", "does not exist"), ("no_split", "split folder"), ("no_label", "label file"),
])
def test_layout_problems_are_one_paragraph(tmp_path, problem, match):
    root = tmp_path / "data"
    if problem != "no_root":
        _cityscapes(root)
    if problem == "no_split":
        import shutil

        shutil.rmtree(root / "Cityscapes" / "gtFine" / "val")
    if problem == "no_label":
        next((root / "Cityscapes" / "gtFine" / "val").rglob("*.png")).unlink()
    with pytest.raises(DataError, match=match) as error:
        list_samples("cityscapes", root, "val")
    assert "Expected <root>/Cityscapes/leftImg8bit" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match="no split 'test'"):
        list_samples("gta5", root, "test")


def test_target_items_carry_no_labels(tmp_path):
    _cityscapes(tmp_path / "data")
    data = SegmentationDataset("cityscapes", tmp_path / "data", "train", tmp_path / "cache", with_labels=False,
                               transform=JointTransform([RandomCrop((5, 5)), RandomFlip()], mean=None, std=None))
    assert not (tmp_path / "cache").exists()  # labels never converted, never read
    image, valid, _ = data[0]
    assert image.shape == (3, 5, 5) and valid.dtype == torch.bool
    assert valid.sum() == 12 and torch.all(image[:, ~valid] == 0)  # 3x4 real pixels inside a padded 5x5 crop
    with pytest.raises(ConfigError, match="unlabeled"):
        JointTransform([RandomCrop((2, 2), cat_max_ratio=0.75)])(Image.new("RGB", (4, 3)), None)


def test_joint_ops_keep_image_and_label_aligned():
    """The image encodes its label in the red channel: after resize, crop and flip they still agree."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 19, (6, 8)).astype(np.uint8)
    label = np.kron(blocks, np.ones((4, 4), np.uint8))  # 24x32, constant 4x4 blocks
    image = np.stack([label * 10, np.zeros_like(label), np.zeros_like(label)], axis=-1).astype(np.uint8)
    transform = JointTransform([Resize((64, 48), keep_ratio=True), RandomCrop((20, 30), cat_max_ratio=0.75),
                                RandomFlip(1.0)], mean=None, std=None)
    for _ in range(5):
        x, y = transform(Image.fromarray(image), Image.fromarray(label))
        inside = y != 255
        red = torch.round(x[0] * 255 / 10)
        # bilinear resizing blurs block edges: compare away from them (pixels equal to their 4-neighbourhood)
        same = (y[1:-1, 1:-1] == y[:-2, 1:-1]) & (y[1:-1, 1:-1] == y[2:, 1:-1]) & \
               (y[1:-1, 1:-1] == y[1:-1, :-2]) & (y[1:-1, 1:-1] == y[1:-1, 2:]) & inside[1:-1, 1:-1]
        assert same.sum() > 50
        assert torch.equal(red[1:-1, 1:-1][same], y[1:-1, 1:-1][same].float())


def test_fit_size_and_rescale():
    assert fit_size((1920, 1080), (2048, 1024)) == (1820, 1024)
    assert fit_size((2048, 1024), (2048, 1024)) == (2048, 1024)
    assert fit_size((1914, 1052), (2560, 1440)) == (2560, 1407)
    logits = torch.randn(2, 19, 8, 16)
    assert rescale_logits(logits, (16, 32)).shape == (2, 19, 16, 32)
    assert rescale_logits(logits, (8, 16)) is logits
