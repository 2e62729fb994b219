"""Built-in street-scene segmentation benchmark `streets`, rendered offline (no data set is downloaded).

Procedural 64x128 street scenes with 10 classes in Cityscapes trainId order (road, sidewalk, building, pole,
traffic sign, vegetation, terrain, sky, person, car; 255 = void), in three domains with the same class colour
families and different rendering (design note segmentation.md 3.2; a shift that keeps colours semantic is one
that self-training can recover, 3.3):

- ``game`` (source): flat palette colours with +-12% value noise per object, no blur, even lighting;
- ``city``: the palette desaturated 35% and darkened 15%, textured by the luminance of photographs that
  scikit-image and scikit-learn ship (gravel road, brick sidewalk and buildings, grass vegetation, ...), overcast
  exposure, a 3x3 blur and sensor noise;
- ``dusty``: the palette mixed 25% with a dust colour, other photo textures, horizon haze, brighter exposure,
  blur and noise; layout statistics differ too (fewer sidewalks and buildings, terrain-dominated ground, more
  persons and trees).

Splits: train (game 600, each target 300: the unlabeled adaptation and calibration pool) and test (100 each).
Deterministic given the seed; rendered once per process and cached on disk (``.npz``, atomically) like digits.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from hdrq_lightning.artifacts import write_npz
from hdrq_lightning.errors import ConfigError

STREETS_CLASSES: tuple[str, ...] = ("road", "sidewalk", "building", "pole", "traffic sign", "vegetation", "terrain",
                                    "sky", "person", "car")
STREETS_DOMAINS: tuple[str, ...] = ("game", "city", "dusty")
STREETS_SOURCE = "game"
STREETS_SPLITS: tuple[str, ...] = ("train", "test")
STREETS_SIZES = {"game": {"train": 600, "test": 100}, "city": {"train": 300, "test": 100},
                 "dusty": {"train": 300, "test": 100}}
HEIGHT, WIDTH = 64, 128
IGNORE_INDEX = 255
# Bump when the rendering changes so stale on-disk caches are never read.
_RENDER_VERSION = 2
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = range(10)

PALETTE = np.array([
    (92, 90, 98),     # road: grey asphalt
    (176, 164, 150),  # sidewalk: light beige grey
    (150, 108, 86),   # building: brick brown
    (58, 58, 62),     # pole: dark grey
    (226, 196, 40),   # traffic sign: yellow
    (62, 132, 52),    # vegetation: green
    (152, 138, 84),   # terrain: dry olive
    (124, 172, 232),  # sky: blue
    (196, 64, 70),    # person: red clothes
    (44, 72, 170),    # car: blue
], dtype=np.float32) / 255.0
DUST = np.array((0.80, 0.68, 0.50), dtype=np.float32)

# Layout statistics per domain: sidewalk probability, buildings per side, trees, persons, terrain share
_LAYOUT = {"game": dict(sidewalk=0.9, buildings=(2, 5), trees=(1, 3), persons=(0, 3), terrain=0.35, cars=(1, 4)),
           "city": dict(sidewalk=0.95, buildings=(3, 6), trees=(0, 2), persons=(1, 4), terrain=0.25, cars=(1, 4)),
           "dusty": dict(sidewalk=0.35, buildings=(0, 3), trees=(2, 5), persons=(2, 6), terrain=0.7, cars=(0, 3))}
# Photo per class for the textured styles (luminance only; colours stay the palette's)
_TEXTURES = {"city": ("gravel", "brick", "brick", "camera", "text", "grass", "gravel", "moon", "chelsea", "coffee"),
             "dusty": ("moon", "gravel", "brick", "camera", "text", "china", "grass", "rocket", "chelsea", "coffee")}


def check_streets(domain: str, split: str) -> None:
    if domain not in STREETS_DOMAINS:
        raise ConfigError(f"Unknown streets domain {domain!r}; choose one of {', '.join(STREETS_DOMAINS)}.")
    if split not in STREETS_SPLITS:
        raise ConfigError(f"Unknown streets split {split!r}; choose one of {', '.join(STREETS_SPLITS)}.")


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    """Grey-level photographs in [0, 1], at least 256 px on their short side."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import rescale
    from sklearn.datasets import load_sample_image

    out = {}
    for name in ("gravel", "brick", "grass", "moon", "camera", "text", "chelsea", "coffee", "rocket", "china"):
        image = load_sample_image(f"{name}.jpg") if name == "china" else getattr(skimage.data, name)()
        image = np.asarray(image, dtype=np.float32)
        image = rgb2gray(image[..., :3] / 255.0) if image.ndim == 3 else image / 255.0
        if min(image.shape) < 256:
            image = rescale(image, 256 / min(image.shape), anti_aliasing=False)
        out[name] = np.ascontiguousarray(image.astype(np.float32))
    return out


def _value_noise(rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in [0, 1] on the image grid (bilinear upsampling of a coarse random grid)."""
    grid = rng.uniform(0, 1, (cells[0] + 1, cells[1] + 1)).astype(np.float32)
    ys = np.linspace(0, cells[0], HEIGHT, dtype=np.float32)
    xs = np.linspace(0, cells[1], WIDTH, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cells[0] - 1), np.minimum(xs.astype(int), cells[1] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _layout(rng: np.random.Generator, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(label map, object id map) of one scene; the object id gives each painted object its own shade."""
    label = np.full((HEIGHT, WIDTH), SKY, dtype=np.uint8)
    objects = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    horizon = rng.uniform(0.38, 0.52) * HEIGHT
    vanish = rng.uniform(0.35, 0.65) * WIDTH
    below = yy >= horizon
    ground = np.where(_value_noise(rng, (3, 6)) < stats["terrain"], TERRAIN, VEGETATION)
    label[below] = ground[below]
    next_id = [1]

    def paint(mask: np.ndarray, cls: int) -> None:
        label[mask] = cls
        objects[mask] = next_id[0]
        next_id[0] += 1

    # buildings along both sides, around the horizon
    for side in (0, 1):
        for _ in range(int(rng.integers(*stats["buildings"]) )):
            width = rng.uniform(0.08, 0.2) * WIDTH
            left = rng.uniform(0, 0.32) * WIDTH if side == 0 else rng.uniform(0.68, 1.0) * WIDTH - width
            top = horizon - rng.uniform(0.15, 0.35) * HEIGHT
            bottom = horizon + rng.uniform(0.02, 0.1) * HEIGHT
            paint((xx >= left) & (xx < left + width) & (yy >= top) & (yy < bottom), BUILDING)
    # road: a perspective trapezoid to the vanishing point; sidewalks beside it
    t = np.clip((yy - horizon) / (HEIGHT - horizon), 0, 1)
    centre = vanish + (WIDTH / 2 + rng.uniform(-0.1, 0.1) * WIDTH - vanish) * t
    half = rng.uniform(0.28, 0.5) * WIDTH * t
    wobble = 1 + 0.08 * np.sin(yy / rng.uniform(3, 6)) if stats["sidewalk"] < 0.5 else 1.0
    distance = np.abs(xx - centre)
    if rng.uniform() < stats["sidewalk"]:
        paint(below & (distance < half * 1.35 * wobble), SIDEWALK)
    paint(below & (distance < half * wobble), ROAD)
    # things, far to near (by their foot row)
    things = []
    for _ in range(int(rng.integers(*stats["trees"]))):
        things.append(("tree", rng.uniform(horizon + 1, HEIGHT)))
    for _ in range(int(rng.integers(0, 3))):
        things.append(("pole", rng.uniform(horizon + 1, HEIGHT)))
    for _ in range(int(rng.integers(*stats["persons"]))):
        things.append(("person", rng.uniform(horizon + 2, HEIGHT)))
    for _ in range(int(rng.integers(*stats["cars"]))):
        things.append(("car", rng.uniform(horizon + 2, HEIGHT)))
    for kind, foot in sorted(things, key=lambda item: item[1]):
        scale = (foot - horizon) / (HEIGHT - horizon)  # 0 at the horizon, 1 at the bottom
        row_t = np.clip((foot - horizon) / (HEIGHT - horizon), 0, 1)
        row_centre = vanish + (WIDTH / 2 - vanish) * row_t
        row_half = max(half.max() * row_t, 2.0)
        if kind == "car":
            x = row_centre + rng.uniform(-0.8, 0.8) * row_half
            w, h = max(4.0, 34 * scale), max(2.5, 16 * scale)
            paint((np.abs(xx - x) < w / 2) & (yy <= foot) & (yy > foot - h), CAR)
        elif kind == "person":
            x = row_centre + rng.choice([-1, 1]) * row_half * rng.uniform(1.0, 1.5)
            w, h = max(3.0, 8 * scale), max(6.0, 22 * scale)
            paint(((xx - x) / (w / 2)) ** 2 + ((yy - (foot - h / 2)) / (h / 2)) ** 2 < 1, PERSON)
        elif kind == "tree":
            x = row_centre + rng.choice([-1, 1]) * row_half * rng.uniform(1.3, 2.4)
            h = max(5.0, 40 * scale)
            paint((np.abs(xx - x) < max(0.6, 2 * scale)) & (yy <= foot) & (yy > foot - h * 0.5), VEGETATION)
            r = max(2.5, 12 * scale)
            paint(((xx - x) / r) ** 2 + ((yy - (foot - h * 0.7)) / (r * 0.9)) ** 2 < 1, VEGETATION)
        else:  # a pole with a sign
            x = row_centre + rng.choice([-1, 1]) * row_half * rng.uniform(1.15, 1.4)
            h = max(6.0, 44 * scale)
            paint((np.abs(xx - x) < max(1.0, 1.6 * scale)) & (yy <= foot) & (yy > foot - h), POLE)
            r = max(2.5, 5.5 * scale)
            sign_y = foot - h
            if rng.uniform() < 0.5:
                paint(((xx - x) ** 2 + (yy - sign_y) ** 2) < r * r, SIGN)
            else:
                paint((np.abs(xx - x) < r) & (np.abs(yy - sign_y) < r), SIGN)
    return label, objects


def _texture(rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    top = int(rng.integers(0, photo.shape[0] - HEIGHT))
    left = int(rng.integers(0, photo.shape[1] - WIDTH))
    patch = photo[top:top + HEIGHT, left:left + WIDTH]
    return patch / max(float(patch.mean()), 1e-3)


def _blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[dy:dy + HEIGHT, dx:dx + WIDTH] for dy in range(3) for dx in range(3)) / 9.0


def _style(domain: str, label: np.ndarray, objects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB float image in [0, 1] of a label map in the domain's rendering."""
    shade = rng.uniform(0.88, 1.12, objects.max() + 1).astype(np.float32)
    if domain == "game":
        image = PALETTE[label] * shade[objects][..., None]
        return np.clip(image * rng.uniform(0.95, 1.05) + rng.normal(0, 0.01, image.shape), 0, 1)
    palette = PALETTE.copy()
    if domain == "city":
        grey = palette.mean(1, keepdims=True)
        palette = (0.65 * palette + 0.35 * grey) * 0.85
        exposure = rng.uniform(0.75, 1.0)
    else:
        palette = 0.75 * palette + 0.25 * DUST
        exposure = rng.uniform(1.0, 1.15)
    photos = _photos()
    textured = np.empty((HEIGHT, WIDTH), dtype=np.float32)
    for cls, name in enumerate(_TEXTURES[domain]):
        mask = label == cls
        if mask.any():
            textured[mask] = (1 + 0.45 * (_texture(rng, photos[name]) - 1))[mask]
    image = palette[label] * (shade[objects] * textured)[..., None] * exposure
    if domain == "dusty":
        yy = np.arange(HEIGHT, dtype=np.float32)[:, None, None] / HEIGHT
        haze = rng.uniform(0.10, 0.25) * np.clip(1.3 - yy * 1.5, 0, 1)
        image = (1 - haze) * image + haze * DUST
    image = _blur(image) + rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1)


def _render(domain: str, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    count = STREETS_SIZES[domain][split]
    rng = np.random.default_rng([seed, STREETS_DOMAINS.index(domain), STREETS_SPLITS.index(split), 7])
    images = np.empty((count, HEIGHT, WIDTH, 3), dtype=np.uint8)
    labels = np.empty((count, HEIGHT, WIDTH), dtype=np.uint8)
    stats = _LAYOUT[domain]
    for i in range(count):
        label, objects = _layout(rng, stats)
        images[i] = np.clip(np.rint(_style(domain, label, objects, rng) * 255), 0, 255).astype(np.uint8)
        labels[i] = label
    return images, labels


@functools.lru_cache(maxsize=8)
def _cached(domain: str, split: str, seed: int, cache_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    path = None if cache_dir is None else Path(cache_dir) / f"streets-v{_RENDER_VERSION}-{domain}-{split}-seed{seed}.npz"
    if path is not None and path.is_file():
        with np.load(path) as cached:
            images, labels = cached["images"], cached["labels"]
    else:
        images, labels = _render(domain, split, seed)
        if path is not None:
            write_npz(path, images=images, labels=labels)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def render_streets(domain: str, split: str, seed: int = 0, cache_dir: str | Path | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 64, 128, 3) uint8 and labels (N, 64, 128) uint8 (class index, 255 void) of one split."""
    check_streets(domain, split)
    return _cached(domain, split, seed, None if cache_dir is None else str(cache_dir))
