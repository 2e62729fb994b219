"""The built-in digits benchmark: shapes, determinism, disjoint pools and measurable domain shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdrq_lightning.data import digits as digits_module
from hdrq_lightning.data.digits import (
    DIGITS_DOMAINS,
    DIGITS_NUM_CLASSES,
    DigitsDomain,
    digits_split_indices,
    render_digits_domain,
)
from hdrq_lightning.errors import ConfigError

TOTAL_DIGITS = 1797  # size of scikit-learn's load_digits


def _border(images: np.ndarray) -> np.ndarray:
    """Pixels of the 2-pixel frame of each image, (N, pixels, channels) float."""
    mask = np.ones(images.shape[1:3], dtype=bool)
    mask[2:-2, 2:-2] = False
    return images[:, mask].astype(np.float64)


def _centre(images: np.ndarray) -> np.ndarray:
    return images[:, 8:24, 8:24].reshape(len(images), -1, images.shape[-1]).astype(np.float64)


def _orientation_degrees(gray: np.ndarray) -> np.ndarray:
    """Principal-axis angle of each image from its central second moments, in [0, 180)."""
    rows, cols = np.mgrid[: gray.shape[1], : gray.shape[2]].astype(np.float64)
    mass = gray.sum(axis=(1, 2))
    mean_row = (gray * rows).sum(axis=(1, 2)) / mass
    mean_col = (gray * cols).sum(axis=(1, 2)) / mass
    d_row, d_col = rows - mean_row[:, None, None], cols - mean_col[:, None, None]
    mu20 = (gray * d_col**2).sum(axis=(1, 2))
    mu02 = (gray * d_row**2).sum(axis=(1, 2))
    mu11 = (gray * d_row * d_col).sum(axis=(1, 2))
    return np.degrees(0.5 * np.arctan2(2 * mu11, mu20 - mu02)) % 180.0


def _angle_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    gap = np.abs(a - b) % 180.0
    return np.minimum(gap, 180.0 - gap)


@pytest.mark.parametrize("domain", DIGITS_DOMAINS)
def test_shapes_dtypes_and_all_classes(domain: str) -> None:
    train_images, train_labels = render_digits_domain(domain, "train")
    test_images, test_labels = render_digits_domain(domain, "test")
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (32, 32, 3)
    assert train_labels.dtype == np.int64 and train_labels.shape == (len(train_images),)
    assert len(train_images) + len(test_images) == TOTAL_DIGITS
    assert 0.7 < len(train_images) / TOTAL_DIGITS < 0.8
    assert set(train_labels.tolist()) == set(range(DIGITS_NUM_CLASSES))
    assert set(test_labels.tolist()) == set(range(DIGITS_NUM_CLASSES))


def test_pools_are_disjoint_cover_everything_and_depend_on_seed() -> None:
    train_pool, test_pool = digits_split_indices(0)
    assert np.intersect1d(train_pool, test_pool).size == 0
    assert np.array_equal(np.union1d(train_pool, test_pool), np.arange(TOTAL_DIGITS))
    other_train, _ = digits_split_indices(1)
    assert not np.array_equal(train_pool, other_train)
    # Labels of every domain's split are the digit labels of its pool.
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for domain in DIGITS_DOMAINS:
        assert np.array_equal(render_digits_domain(domain, "test")[1], targets[test_pool])


def test_rendering_is_deterministic_given_seed() -> None:
    render = digits_module._render_whole_domain.__wrapped__  # bypass the in-memory cache
    first, _ = render("textured", 0, None)
    again, _ = render("textured", 0, None)
    other, _ = render("textured", 1, None)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_disk_cache_round_trip(tmp_path) -> None:
    render = digits_module._render_whole_domain.__wrapped__
    rendered, labels = render("negative", 3, str(tmp_path))
    assert [path.name for path in tmp_path.iterdir()] == [f"digits-v{digits_module._RENDER_VERSION}-negative-seed3.npz"]
    loaded, loaded_labels = render("negative", 3, str(tmp_path))
    assert np.array_equal(rendered, loaded) and np.array_equal(labels, loaded_labels)


def test_negative_swaps_strokes_and_background_in_its_dominant_channel() -> None:
    clean, _ = render_digits_domain("clean", "test")
    negative, _ = render_digits_domain("negative", "test")
    assert _border(negative).mean() > _border(clean).mean() + 40
    clean_contrast = _centre(clean).mean(axis=(1, 2)) - _border(clean).mean(axis=(1, 2))
    assert (clean_contrast > 0).mean() > 0.99  # clean strokes (centre) are brighter than the frame
    # A channel blended as tint * (1 - stroke) + (1 - tint) * stroke has frame value tint and is a
    # negative (centre darker than frame) exactly where tint > 1/2.
    border_channels = _border(negative).mean(axis=1)
    dominant = border_channels.argmax(axis=1)
    rows = np.arange(len(negative))
    dominant_tint = border_channels[rows, dominant] / 255.0
    negative_contrast = _centre(negative).mean(axis=1)[rows, dominant] - border_channels[rows, dominant]
    assert (dominant_tint > 0.5).mean() > 0.5
    assert ((negative_contrast < 0) == (dominant_tint > 0.5)).mean() > 0.95


def test_textured_background_is_coloured_and_varied() -> None:
    clean, _ = render_digits_domain("clean", "test")
    textured, _ = render_digits_domain("textured", "test")
    channel_spread = lambda images: np.ptp(images.astype(np.float64), axis=-1).mean()  # noqa: E731
    assert channel_spread(clean) < 1.0 < 10.0 < channel_spread(textured)
    assert _border(textured).std(axis=1).mean() > 2 * _border(clean).std(axis=1).mean()


def test_rotated_turns_and_thickens_strokes() -> None:
    clean, labels = render_digits_domain("clean", "test")
    rotated, _ = render_digits_domain("rotated", "test")
    clean_gray = clean.astype(np.float64).mean(-1)
    rotated_gray = rotated.astype(np.float64).mean(-1)
    clean_gray = np.clip(clean_gray - np.median(_border(clean[..., :1])[:, :, 0], axis=1)[:, None, None], 0, None)
    ones = labels == 1  # elongated digits have a well-defined principal axis
    gap = _angle_gap(_orientation_degrees(clean_gray[ones]), _orientation_degrees(rotated_gray[ones]))
    assert np.median(gap) > 20.0
    bright = lambda gray: (gray > 128).mean()  # noqa: E731
    assert bright(rotated_gray) > 1.3 * bright(clean_gray)


def test_dataset_items_and_transform() -> None:
    dataset = DigitsDomain("rotated", "test")
    image, label, index = dataset[5]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0
    raw_images, raw_labels = render_digits_domain("rotated", "test")
    assert torch.allclose(image, torch.from_numpy(raw_images[5]).permute(2, 0, 1).float() / 255.0)
    assert (label, index) == (int(raw_labels[5]), 5)
    assert dataset.classes == [str(d) for d in range(10)] and len(dataset) == len(raw_labels)
    sizes = DigitsDomain("clean", "train", transform=lambda pil: torch.tensor(pil.size))[0][0]
    assert sizes.tolist() == [32, 32]


def test_unknown_domain_or_split_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="clean, negative, textured, rotated"):
        render_digits_domain("mnist", "train")
    with pytest.raises(ConfigError, match="train, test"):
        DigitsDomain("clean", "validation")
