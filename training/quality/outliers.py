"""The unknown-input detector's evaluation: sets of inputs that no class covers (crops of real
photos, scikit-learn's 8x8 digits upscaled, OpenCV's real handwritten digits when Debian's
opencv-doc is installed, uniform noise, blank images), brought to the model's input through the
shared preprocessing, and the report of how the detector separates them from the test split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.core.preprocessing import ImageSpec, preprocess_array
from training.config import THRESHOLD_CONFIDENCE
from training.quality.calibration import format_calibration
from training.quality.detector import UnknownInputDetector

log = logging.getLogger(__name__)


SET_SIZE = 300
# 5,000 real handwritten digits, 20x20 cells of one image (500 of each digit, five rows of 100
# per digit), shipped by Debian's opencv-doc package (BSD licence).
OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
DIGIT_CELL = 20
# How many of them the report measures (100 of each digit), and the name of their set.
REAL_DIGITS = 1000
REAL_DIGITS_SET = "real handwritten digits (OpenCV)"


def _photo_crops(spec: ImageSpec, rng: np.random.Generator, count: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        size = int(rng.integers(48, 320))
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        crops.append(preprocess_array(photo[top : top + size, left : left + size], spec))
    return np.stack(crops)


def _digits(spec: ImageSpec, count: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]  # 8x8, ink 0..16
    pixels = np.round(digits * (255 / 16)).astype(np.uint8)
    return np.stack([preprocess_array(image, spec) for image in pixels])


def opencv_digits(path: Path = OPENCV_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's real handwritten digits: ``(5000, 20, 20)`` uint8 images (white ink on black)
    and their ``(5000,)`` labels, 0-9.

    Raises:
        FileNotFoundError: the file is missing (``apt-get install opencv-doc`` brings it).
    """
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install opencv-doc brings it")
    with Image.open(path) as sheet:
        pixels = np.asarray(sheet.convert("L"))
    rows, columns = pixels.shape[0] // DIGIT_CELL, pixels.shape[1] // DIGIT_CELL
    cells = pixels[: rows * DIGIT_CELL, : columns * DIGIT_CELL].reshape(
        rows, DIGIT_CELL, columns, DIGIT_CELL
    )
    cells = cells.transpose(0, 2, 1, 3).reshape(-1, DIGIT_CELL, DIGIT_CELL)
    labels = np.repeat(np.arange(10), len(cells) // 10)
    return cells, labels


def _noise(spec: ImageSpec, rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, *spec.shape), dtype=np.uint8)


def _blank(spec: ImageSpec, count: int) -> np.ndarray:
    levels = np.linspace(0, 255, count).round().astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, *spec.shape)).copy()


def _real_digits(spec: ImageSpec, count: int) -> np.ndarray | None:
    """``count`` of OpenCV's real handwritten digits (the same share of each digit), or None
    when opencv-doc is not installed."""
    try:
        cells, _ = opencv_digits()
    except FileNotFoundError as exc:
        log.warning("real handwritten digits not measured: %s", exc)
        return None
    chosen = np.linspace(0, len(cells) - 1, min(count, len(cells))).round().astype(int)
    return np.stack([preprocess_array(cells[index], spec) for index in chosen])


def outlier_sets(
    spec: ImageSpec,
    test_inputs: np.ndarray,
    seed: int,
    count: int = SET_SIZE,
    real_digits: int = REAL_DIGITS,
):
    """The evaluation sets, each ``(N, H, W, C)`` uint8 at the model's input spec: ``count``
    images each, and ``real_digits`` of OpenCV's handwritten digits when they are installed."""
    rng = np.random.default_rng(seed)
    sets = {
        "photo crops": _photo_crops(spec, rng, count),
        "digits (8x8, upscaled)": _digits(spec, count),
    }
    digits = _real_digits(spec, real_digits) if real_digits else None
    if digits is not None:
        sets[REAL_DIGITS_SET] = digits
    return sets | {
        "uniform noise": _noise(spec, rng, count),
        "blank images": _blank(spec, count),
        "inverted test images": (255 - test_inputs[:count]).astype(np.uint8),
    }


def detection_report(
    detector: UnknownInputDetector,
    acceptance: float,
    test_scores: np.ndarray,
    test_confidence: np.ndarray,
    outliers: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict:
    """How the detector (and, for comparison, the top-1 softmax score) separates the test split
    from each outlier set.

    Args:
        outliers: name -> (detector scores, top-1 calibrated softmax scores) of the set.

    Returns:
        ``{"threshold", "acceptance", "test_flagged", "sets": {name: {"flagged", "auroc",
        "softmax_auroc", "images"}}}``.
    """
    from sklearn.metrics import roc_auc_score

    def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
        truth = np.concatenate([np.zeros(len(inside)), np.ones(len(outside))])
        return round(float(roc_auc_score(truth, np.concatenate([inside, outside]))), 4)

    sets = {}
    for name, (scores, confidence) in outliers.items():
        sets[name] = {
            "images": int(len(scores)),
            "flagged": round(float(np.mean(scores > detector.threshold)), 4),
            "auroc": auroc(test_scores, scores),
            # Low confidence as the score: what the softmax alone would give.
            "softmax_auroc": auroc(-test_confidence, -confidence),
        }
    return {
        "method": detector.method,
        "threshold": round(detector.threshold, 5),
        "acceptance": acceptance,
        "test_flagged": round(float(np.mean(test_scores > detector.threshold)), 4),
        "sets": sets,
    }


def format_detection(report: dict, calibration: dict) -> str:
    """The report's table, as the README shows it."""
    lines = [
        "| inputs | images | flagged unknown | AUROC, detector | AUROC, top-1 softmax |",
        "| --- | --- | --- | --- | --- |",
        f"| held-out test split (in distribution) | | {report['test_flagged']:.1%} | | |",
    ]
    for name, figures in report["sets"].items():
        lines.append(
            f"| {name} | {figures['images']} | {figures['flagged']:.1%} | {figures['auroc']} "
            f"| {figures['softmax_auroc']} |"
        )
    lines += [
        "",
        f"Detector: {report['method']}. Threshold {report['threshold']:.3f}: at least "
        f"{report['acceptance']:.0%} of new images like the training data pass, with "
        f"{THRESHOLD_CONFIDENCE:.0%} confidence (set on the validation split).",
        "",
        format_calibration(calibration),
    ]
    return "\n".join(lines)
