"""The audit's out-of-fold predictions are reused for unchanged data, and only then
(training/audit/cache.py)."""

import numpy as np

from training.audit.cache import KEEP, cache_key, cached
from training.audit.predictions import OutOfFold
from training.audit.run import out_of_fold
from training.data.sources import LabelledImages


def _images(pixels: np.ndarray, names: np.ndarray) -> LabelledImages:
    return LabelledImages(
        names=names, class_order=("a", "b"), source="test", fingerprint="f" * 64, channels=1,
        native_size=8, pixels=pixels,
    )  # fmt: skip


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], 20)
    features = rng.normal(size=(40, 6)) + labels[:, None] * 2.0
    pixels = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    return _images(pixels, np.where(labels == 0, "a", "b")), labels, features


def _counted_fit(features: np.ndarray, labels: np.ndarray):
    """A real out-of-fold fit, and the list of its calls."""
    fits = []

    def predict() -> OutOfFold:
        fits.append(1)
        return out_of_fold(features, labels, None, 2, 3, 1, 0)

    return fits, predict


def test_unchanged_data_reuses_the_predictions_and_a_change_fits_again(tmp_path):
    images, labels, features = _data()
    fits, predict = _counted_fit(features, labels)

    key = cache_key(images, labels, folds=3, seed=0)
    first = cached(predict, tmp_path, key, say=lambda _: None)()
    again = cached(predict, tmp_path, key, say=lambda _: None)()
    assert len(fits) == 1
    np.testing.assert_array_equal(first.probabilities, again.probabilities)
    np.testing.assert_array_equal(first.ood_scores, again.ood_scores)
    assert (first.method, first.folds) == (again.method, again.folds)
    # Another seed, another label, other pixels: each another key.
    relabelled = labels.copy()
    relabelled[0] = 1
    other_pixels = images.pixels.copy()
    other_pixels[0, 0, 0] ^= 1
    keys = {
        key,
        cache_key(images, labels, folds=3, seed=1),
        cache_key(images, relabelled, folds=3, seed=0),
        cache_key(_images(other_pixels, images.names), labels, folds=3, seed=0),
    }
    assert len(keys) == 4


def test_a_damaged_entry_is_fitted_again_and_old_entries_go(tmp_path):
    images, labels, features = _data()
    fits, predict = _counted_fit(features, labels)

    key = cache_key(images, labels)
    (tmp_path / f"{key}.npz").write_bytes(b"half written")
    cached(predict, tmp_path, key, say=lambda _: None)()
    assert len(fits) == 1
    whole = (tmp_path / f"{key}.npz").read_bytes()
    (tmp_path / f"{key}.npz").write_bytes(whole[: len(whole) // 2])  # a real entry, cut short
    cached(predict, tmp_path, key, say=lambda _: None)()
    assert len(fits) == 2
    for seed in range(KEEP + 2):
        cached(predict, tmp_path, cache_key(images, labels, seed=seed), say=lambda _: None)()
    assert len(list(tmp_path.glob("*.npz"))) == KEEP
    assert not list(tmp_path.glob(".partial-*"))
