"""Street-scene segmentation data sets in their published layouts: GTA5, Cityscapes, IDD (Cityscapes trainIds).

    <root>/GTA5/images/00001.png                     <root>/GTA5/labels/00001.png (pixel = Cityscapes label id)
    <root>/Cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    <root>/Cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
    <root>/IDD_Segmentation/leftImg8bit/<split>/<seq>/<frame>_leftImg8bit.{png,jpg}
    <root>/IDD_Segmentation/gtFine/<split>/<seq>/<frame>_gtFine_polygons.json

Labels are converted to the 19 Cityscapes trainIds (255 = ignore) by the tables of HRDA's ``gta.py`` /
cityscapesscripts (GTA5, Cityscapes) and by rasterising IDD's polygons with the name table of the official HDRQ
code (``idd_labels.py``). ``prepare_labels`` converts every label once into ``<cache>/<dataset>/<split>/`` (PNG,
written atomically, in parallel worker processes) together with ``class_stats.json``: each image's pixel count
per class (what rare-class sampling reads), keyed by a digest of the file list, so nothing is a separate script
to remember and a changed file list is never read with stale statistics. ``SegmentationDataset`` serves (image,
label, index) through a joint transform (data/joint_transforms.py); a target domain in adaptation is served
without labels (``with_labels=False``), so no transform can read target ground truth.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from hdrq_lightning.artifacts import atomic_path, read_json, write_json
from hdrq_lightning.errors import DataError

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
IGNORE_INDEX = 255
# Bump when a table or the rasterisation changes: converted caches of another version are never read.
LABEL_VERSION = 1

# Cityscapes label id -> trainId (cityscapesscripts' table; HRDA's tools/convert_datasets/gta.py uses the same).
_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                   26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _id, _train_id in _ID_TO_TRAIN_ID.items():
    ID_TO_TRAIN_ID[_id] = _train_id
ID_TO_TRAIN_ID.setflags(write=False)

# IDD polygon label name -> Cityscapes trainId (official HDRQ code's idd_labels.py via mseg's IDD ids).
IDD_NAME_TO_TRAIN_ID: dict[str, int] = {
    "road": 0, "parking": 255, "drivable fallback": 255, "sidewalk": 1, "rail track": 255,
    "non-drivable fallback": 9, "person": 11, "animal": 255, "rider": 12, "motorcycle": 17, "bicycle": 18,
    "autorickshaw": 255, "car": 13, "truck": 14, "bus": 15, "caravan": 255, "trailer": 255, "train": 16,
    "vehicle fallback": 255, "curb": 255, "wall": 3, "fence": 4, "guard rail": 255, "billboard": 255,
    "traffic sign": 7, "traffic light": 6, "pole": 5, "polegroup": 255, "obs-str-bar-fallback": 255,
    "building": 2, "bridge": 255, "tunnel": 255, "vegetation": 8, "sky": 10, "fallback background": 255,
    "unlabeled": 255, "ego vehicle": 255, "rectification border": 255, "out of roi": 255, "license plate": 255,
}

_LAYOUTS = {
    "gta5": "<root>/GTA5/images/<frame>.png and <root>/GTA5/labels/<frame>.png (label pixels = Cityscapes label ids)",
    "cityscapes": "<root>/Cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
                  "<root>/Cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png",
    "idd": "<root>/IDD_Segmentation/leftImg8bit/<split>/<seq>/<frame>_leftImg8bit.{png,jpg} and "
           "<root>/IDD_Segmentation/gtFine/<split>/<seq>/<frame>_gtFine_polygons.json",
}
SPLITS = {"gta5": ("train",), "cityscapes": ("train", "val"), "idd": ("train", "val")}


@dataclass(frozen=True)
class Sample:
    """One image and its raw label file (a label-id PNG, or IDD's polygon JSON)."""

    image: Path
    label: Path
    key: str  # relative name, unique in the split: the converted label's file name


def _layout_error(dataset: str, root: Path, problem: str) -> DataError:
    return DataError(f"{dataset} data at {root}: {problem}. Expected {_LAYOUTS[dataset]}. Point "
                     f"data.root at the folder that holds {_folder(dataset)}/ (paths.data_dir or HDRQ_DATA_DIR).")


def _folder(dataset: str) -> str:
    return {"gta5": "GTA5", "cityscapes": "Cityscapes", "idd": "IDD_Segmentation"}[dataset]


def check_layout(dataset: str, root: str | os.PathLike, split: str) -> None:
    """The folders of ``dataset``'s ``split`` exist (cheap: no file is listed); else the one-paragraph error."""
    if dataset not in _LAYOUTS:
        raise DataError(f"segmentation data set {dataset!r} is unknown; use one of {sorted(_LAYOUTS)}.")
    if split not in SPLITS[dataset]:
        raise DataError(f"{dataset} has no split {split!r}; it has {list(SPLITS[dataset])}.")
    base = Path(root) / _folder(dataset)
    folders = ([base / "images", base / "labels"] if dataset == "gta5"
               else [base / "leftImg8bit" / split, base / "gtFine" / split])
    for folder in (base, *folders):
        if not folder.is_dir():
            raise _layout_error(dataset, Path(root), f"the folder {folder} does not exist")


def list_samples(dataset: str, root: str | os.PathLike, split: str) -> list[Sample]:
    """The (image, label) pairs of ``dataset``'s ``split`` under ``root``, sorted; a missing folder, split or
    label file is a one-paragraph DataError showing the expected tree."""
    if dataset not in _LAYOUTS:
        raise DataError(f"segmentation data set {dataset!r} is unknown; use one of {sorted(_LAYOUTS)}.")
    if split not in SPLITS[dataset]:
        raise DataError(f"{dataset} has no split {split!r}; it has {list(SPLITS[dataset])}.")
    root = Path(root)
    base = root / _folder(dataset)
    if not base.is_dir():
        raise _layout_error(dataset, root, f"the folder {base} does not exist")
    if dataset == "gta5":
        images_dir, labels_dir = base / "images", base / "labels"
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise _layout_error(dataset, root, f"the folder {folder} does not exist")
        images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")
        pairs = [(image, labels_dir / image.name, image.stem) for image in images]
    else:
        images_dir, labels_dir = base / "leftImg8bit" / split, base / "gtFine" / split
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise _layout_error(dataset, root, f"the split folder {folder} does not exist")
        suffix = "_gtFine_labelIds.png" if dataset == "cityscapes" else "_gtFine_polygons.json"
        images = sorted(p for p in images_dir.glob("*/*_leftImg8bit.*") if p.suffix.lower() in (".png", ".jpg"))
        pairs = []
        for image in images:
            stem = image.name[: -len("_leftImg8bit" + image.suffix)]
            pairs.append((image, labels_dir / image.parent.name / f"{stem}{suffix}", f"{image.parent.name}/{stem}"))
    if not pairs:
        raise _layout_error(dataset, root, f"no images found for split {split!r}")
    missing = [str(label) for _, label, _ in pairs if not label.is_file()]
    if missing:
        raise _layout_error(dataset, root, f"{len(missing)} label file(s) are missing, e.g. {missing[0]}")
    return [Sample(image, label, key) for image, label, key in pairs]


def convert_label_ids(ids: np.ndarray) -> np.ndarray:
    """Cityscapes label ids (GTA5 and Cityscapes label PNGs) -> trainIds, 255 elsewhere."""
    return ID_TO_TRAIN_ID[ids.astype(np.int64).clip(0, 255)]


def rasterize_idd_polygons(record: dict, unknown: set[str] | None = None) -> np.ndarray:
    """IDD's ``*_gtFine_polygons.json`` -> a trainId map: background 255, polygons in file order (later on
    top), deleted objects and polygons of fewer than 3 points skipped, ``<name>group`` read as ``<name>`` when
    the name is otherwise unknown, unknown names -> 255 (collected in ``unknown``)."""
    height, width = int(record["imgHeight"]), int(record["imgWidth"])
    canvas = Image.new("L", (width, height), IGNORE_INDEX)
    draw = ImageDraw.Draw(canvas)
    for obj in record.get("objects", []):
        if obj.get("deleted"):
            continue
        polygon = [tuple(map(float, point)) for point in obj.get("polygon", [])]
        if len(polygon) < 3:
            continue
        name = obj.get("label", "")
        if name not in IDD_NAME_TO_TRAIN_ID and name.endswith("group"):
            name = name[: -len("group")]
        if name not in IDD_NAME_TO_TRAIN_ID:
            if unknown is not None:
                unknown.add(name)
            value = IGNORE_INDEX
        else:
            value = IDD_NAME_TO_TRAIN_ID[name]
        draw.polygon(polygon, fill=value, outline=value)
    return np.asarray(canvas, dtype=np.uint8)


def read_train_ids(dataset: str, label: Path, unknown: set[str] | None = None) -> np.ndarray:
    """The trainId map of one raw label file."""
    if dataset == "idd":
        return rasterize_idd_polygons(json.loads(Path(label).read_text()), unknown)
    return convert_label_ids(np.asarray(Image.open(label)))


def _convert_one(job: tuple[str, str, str, str]) -> tuple[str, list[int], list[str]]:
    """Worker: convert one label into its cache file (atomically); returns (key, class pixel counts, unknown)."""
    dataset, label, target, image = job
    unknown: set[str] = set()
    train_ids = read_train_ids(dataset, Path(label), unknown)
    with Image.open(image) as img:
        size = img.size
    if train_ids.shape[::-1] != size:  # a redistribution with mismatched sizes: the label follows the image
        warnings.warn(f"{label} is {train_ids.shape[::-1]} but its image is {size}; resized (nearest).",
                      stacklevel=1)
        train_ids = np.asarray(Image.fromarray(train_ids).resize(size, Image.NEAREST))
    with atomic_path(target) as tmp:
        Image.fromarray(train_ids).save(tmp, format="PNG")
    counts = np.bincount(train_ids.reshape(-1), minlength=256)[: len(CITYSCAPES_CLASSES)]
    return str(Path(target).name), counts.tolist(), sorted(unknown)


def file_list_digest(samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256(f"v{LABEL_VERSION}".encode())
    for sample in samples:
        stat = sample.label.stat()
        digest.update(f"{sample.key}\0{stat.st_size}\0{int(stat.st_mtime)}\n".encode())
    return digest.hexdigest()[:16]


def converted_path(cache_dir: Path, dataset: str, split: str, key: str) -> Path:
    return Path(cache_dir) / dataset / split / f"{key.replace('/', '__')}.png"


def prepare_labels(dataset: str, samples: Sequence[Sample], split: str, cache_dir: str | os.PathLike,
                   workers: int = 0) -> dict[str, list[int]]:
    """Convert every label of the split into the cache (once) and return {key: class pixel counts}.

    The statistics file records the digest of the file list; when it matches, nothing is converted again. A
    conversion interrupted half-way leaves only whole files (each written atomically) and no statistics, so the
    next call converts what is missing. ``workers``: processes (0: as many as CPUs, at most 8).
    """
    cache_dir = Path(cache_dir)
    stats_path = cache_dir / dataset / split / "class_stats.json"
    digest = file_list_digest(samples)
    if stats_path.is_file():
        cached = read_json(stats_path)
        if cached.get("digest") == digest and cached.get("version") == LABEL_VERSION:
            return cached["counts"]
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(dataset, str(s.label), str(converted_path(cache_dir, dataset, split, s.key)), str(s.image))
            for s in samples]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 16:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_convert_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        results = [_convert_one(job) for job in jobs]
    unknown = sorted({name for _, _, names in results for name in names})
    if unknown:
        warnings.warn(f"{dataset} {split}: label names {unknown} are not in the IDD table; their pixels are "
                      "ignored (255).", stacklevel=2)
    counts = {sample.key: result[1] for sample, result in zip(samples, results)}
    write_json(stats_path, {"version": LABEL_VERSION, "digest": digest, "classes": list(CITYSCAPES_CLASSES),
                            "counts": counts})
    return counts


class SegmentationDataset(Dataset):
    """One split of GTA5 / Cityscapes / IDD with converted labels; items (image, label, index) through
    ``transform(image, label) -> (image tensor, label tensor)`` (data/joint_transforms.py). With
    ``with_labels=False`` (a target in adaptation) the label is never read: items are (image, valid mask, index)
    where the mask marks the real image pixels (True) as opposed to padding."""

    def __init__(self, dataset: str, root: str | os.PathLike, split: str, cache_dir: str | os.PathLike,
                 transform: Callable | None = None, with_labels: bool = True, workers: int = 0) -> None:
        self.dataset, self.split, self.transform, self.with_labels = dataset, split, transform, with_labels
        self.samples = list_samples(dataset, root, split)
        self.cache_dir = Path(cache_dir)
        self.class_counts = prepare_labels(dataset, self.samples, split, cache_dir, workers) if with_labels else None
        self.classes = list(CITYSCAPES_CLASSES)

    def __len__(self) -> int:
        return len(self.samples)

    def class_count_array(self) -> np.ndarray:
        """[images, classes] pixel counts of the converted labels (rare class sampling)."""
        if self.class_counts is None:
            raise DataError("class statistics exist only for a labelled data set (with_labels=True).")
        return np.asarray([self.class_counts[sample.key] for sample in self.samples])

    def label(self, index: int) -> Image.Image:
        sample = self.samples[index]
        return Image.open(converted_path(self.cache_dir, self.dataset, self.split, sample.key))

    def __getitem__(self, index: int):
        from hdrq_lightning.data.joint_transforms import to_tensors

        with Image.open(self.samples[index].image) as img:
            image = img.convert("RGB")
        label = self.label(index) if self.with_labels else None
        transform = self.transform or to_tensors
        image_tensor, second = transform(image, label)
        return image_tensor, second, index
