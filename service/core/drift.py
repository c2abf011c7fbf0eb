"""Has what the model sees moved away from what it was trained on? Windowed two-sample tests
against the reference the training job ships with the model, and two label-free estimates of
the accuracy on a window. Only numpy and the standard library: the service imports it.

The reference (``drift_reference.npz``, :class:`DriftReference`) holds, for held-out images of
the validation split (never the training images): their calibrated softmax outputs, their
unknown-input scores, a sample of their features, and the threshold of Average Thresholded
Confidence, fitted on the same split.

A window of N answered images is compared with it by three families of tests (Rabanser et al.,
*Failing Loudly*, 2019):

- ``bbsd``: black-box shift detection, a two-sample Kolmogorov-Smirnov test per class on the
  calibrated scores, Bonferroni-corrected over the K classes;
- ``knn``: a two-sample KS test on the unknown-input score, which is the mean over feature
  layers of the distance to the k-th nearest training image (the detector's bank): a
  multivariate test of the features reduced to one number the graph already computes;
- ``label``: the share of each predicted class against the reference's, a two-proportion z-test
  per class, Bonferroni-corrected (label shift: a season in which one class is more common).

The window is called drifted when any family's corrected p-value is below ``alpha / families``
(Bonferroni again), so the false-alarm rate on windows like the reference is at most ``alpha``.

The estimates of the accuracy, without labels:

- ``mean_confidence``: the mean top-1 calibrated score (what the service reported before);
- ``atc``: Average Thresholded Confidence (Garg et al., ICLR 2022): the share of the window
  whose top-1 score is above the threshold ``t`` at which the validation split's share above
  ``t`` equals its accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REFERENCE_FILE = "drift_reference.npz"
# The families of tests, in the order the metrics and reports list them.
BBSD, KNN, LABEL = "bbsd", "knn", "label"
TESTS = (BBSD, KNN, LABEL)
ATC, MEAN_CONFIDENCE = "atc", "mean_confidence"
ESTIMATORS = (ATC, MEAN_CONFIDENCE)
DEFAULT_ALPHA = 0.05
# Features of at most this many held-out images are kept in the reference.
FEATURE_SAMPLE_ROWS = 1000


class ReferenceError(ValueError):
    """A reference file that cannot be read; the message is one line naming it."""


@dataclass
class DriftReference:
    """What the window tests compare with: held-out images' outputs, as the service computes
    them."""

    probabilities: np.ndarray  # (M, K) float32, calibrated softmax of the validation split
    ood_scores: np.ndarray | None  # (M,) float32, None for a model without a detector
    atc_threshold: float  # top-1 score above which the validation share equals its accuracy
    accuracy: float  # the validation split's accuracy, which ATC's threshold is fitted to
    priors: np.ndarray  # (K,) float64, the training split's class shares
    features: np.ndarray | None = None  # (<= FEATURE_SAMPLE_ROWS, D) float32, a sample
    # The share of the scores equal to the threshold that counts as above it: a confident
    # model's top-1 scores saturate at 1.0 in float32, so many are tied at the threshold.
    atc_tie_weight: float = 0.0
    # The reference's predicted-class counts, derived.
    predicted_counts: np.ndarray = field(init=False)
    # Each class's scores sorted, and the unknown-input scores sorted, for the KS tests.
    sorted_columns: np.ndarray = field(init=False)
    sorted_ood: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        self.probabilities = np.asarray(self.probabilities, dtype=np.float32)
        classes = self.probabilities.shape[1]
        self.predicted_counts = np.bincount(
            self.probabilities.argmax(axis=1), minlength=classes
        ).astype(np.float64)
        self.sorted_columns = np.sort(self.probabilities, axis=0)
        self.sorted_ood = None if self.ood_scores is None else np.sort(self.ood_scores)

    def atc_estimate(self, confidences: np.ndarray) -> float:
        """ATC's accuracy estimate of top-1 scores: the share above the threshold, and the tied
        ones at its weight."""
        confidences = np.asarray(confidences, dtype=np.float32)
        above = np.mean(confidences > np.float32(self.atc_threshold))
        tied = np.mean(confidences == np.float32(self.atc_threshold))
        return float(above + self.atc_tie_weight * tied)

    @property
    def size(self) -> int:
        return len(self.probabilities)

    @property
    def num_classes(self) -> int:
        return self.probabilities.shape[1]

    def save(self, path: Path) -> None:
        arrays = {
            "probabilities": self.probabilities,
            "atc_threshold": np.float64(self.atc_threshold),
            "atc_tie_weight": np.float64(self.atc_tie_weight),
            "accuracy": np.float64(self.accuracy),
            "priors": np.asarray(self.priors, dtype=np.float64),
        }
        if self.ood_scores is not None:
            arrays["ood_scores"] = np.asarray(self.ood_scores, dtype=np.float32)
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)
        with open(path, "wb") as stream:
            np.savez(stream, **arrays)

    @classmethod
    def load(cls, path: Path, features: bool = True) -> DriftReference:
        """Read a reference back; ``features=False`` leaves the feature sample out (the service
        does not use it)."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                files = set(stored.files)
                return cls(
                    probabilities=stored["probabilities"],
                    ood_scores=stored["ood_scores"] if "ood_scores" in files else None,
                    atc_threshold=float(stored["atc_threshold"]),
                    accuracy=float(stored["accuracy"]),
                    priors=stored["priors"],
                    features=stored["features"] if features and "features" in files else None,
                    atc_tie_weight=float(stored["atc_tie_weight"])
                    if "atc_tie_weight" in files
                    else 0.0,
                )
        except (OSError, KeyError, ValueError) as error:
            raise ReferenceError(f"{path} is not a drift reference ({error})") from None


def build_reference(
    probabilities: np.ndarray,
    labels: np.ndarray,
    ood_scores: np.ndarray | None,
    train_labels: np.ndarray,
    features: np.ndarray | None = None,
    seed: int = 0,
) -> DriftReference:
    """The reference of held-out images: their calibrated scores, true labels, unknown-input
    scores and features, and the training split's labels (for the priors)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    classes = probabilities.shape[1]
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    if features is not None and len(features) > FEATURE_SAMPLE_ROWS:
        rows = np.random.default_rng(seed).choice(len(features), FEATURE_SAMPLE_ROWS, False)
        features = np.asarray(features)[np.sort(rows)]
    priors = np.bincount(np.asarray(train_labels, dtype=int), minlength=classes).astype(float)
    threshold, tie_weight = atc_fit(probabilities.max(axis=1), correct)
    return DriftReference(
        probabilities=probabilities,
        ood_scores=None if ood_scores is None else np.asarray(ood_scores, dtype=np.float32),
        atc_threshold=threshold,
        atc_tie_weight=tie_weight,
        accuracy=float(correct.mean()) if len(correct) else 0.0,
        priors=priors / max(priors.sum(), 1.0),
        features=None if features is None else np.asarray(features, dtype=np.float32),
    )


def atc_fit(confidences: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """ATC's threshold ``t`` on held-out scores (Garg et al., 2022): the share of
    ``confidences`` above ``t`` equals the accuracy ``mean(correct)``. With scores tied at ``t``
    (saturated at 1.0), also the weight of a tied score that makes the shares equal exactly.

    Returns:
        ``(t, tie weight)``.
    """
    confidences = np.sort(np.asarray(confidences, dtype=np.float32))
    if not len(confidences):
        return 0.0, 0.0
    target = float(np.mean(correct)) * len(confidences)  # how many should count as above
    below = len(confidences) - int(np.ceil(target))
    threshold = confidences[min(max(below, 0), len(confidences) - 1)]
    if target >= len(confidences):
        threshold = confidences[0]
    above = float(np.sum(confidences > threshold))
    tied = float(np.sum(confidences == threshold))
    weight = min(max((target - above) / tied, 0.0), 1.0) if tied else 0.0
    return float(threshold), weight


# --- the tests ---------------------------------------------------------------------------------


def kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution: ``2 sum (-1)^(j-1) exp(-2 j^2 x^2)``."""
    if x < 0.2:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * x * x)
        total += term if j % 2 else -term
        if term < 1e-16:
            break
    return float(min(max(2.0 * total, 0.0), 1.0))


def ks_statistics(sorted_reference: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The two-sample KS statistic of each column: ``sup |F_ref - F_window|``, with
    ``sorted_reference`` ``(M, C)`` sorted per column and ``window`` ``(n, C)``, or both 1-D."""
    one = sorted_reference.ndim == 1
    reference = sorted_reference[:, np.newaxis] if one else sorted_reference
    window = np.sort(window[:, np.newaxis] if one else window, axis=0)
    m, n = len(reference), len(window)
    statistics = np.empty(reference.shape[1])
    for column in range(reference.shape[1]):
        ref, win = reference[:, column], window[:, column]
        points = np.concatenate([ref, win])
        gap = np.abs(
            np.searchsorted(ref, points, side="right") / m
            - np.searchsorted(win, points, side="right") / n
        )
        statistics[column] = gap.max()
    return statistics[0] if one else statistics


def ks_pvalue(statistic: float, m: int, n: int) -> float:
    """The asymptotic two-sided p-value of a two-sample KS statistic, with Stephens's (1970)
    small-sample correction: ``Q((sqrt(e) + 0.12 + 0.11 / sqrt(e)) D)``, ``e = m n / (m + n)``."""
    effective = m * n / (m + n)
    root = math.sqrt(effective)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * float(statistic))


def proportion_pvalues(
    window_counts: np.ndarray, n: int, reference_counts: np.ndarray, m: int
) -> np.ndarray:
    """Two-sided p-values of the two-proportion z-test of each class's share."""
    pooled = (window_counts + reference_counts) / (n + m)
    spread = np.sqrt(np.maximum(pooled * (1 - pooled) * (1 / n + 1 / m), 1e-300))
    z = np.abs(window_counts / n - reference_counts / m) / spread
    return np.array([math.erfc(value / math.sqrt(2)) for value in z])


@dataclass
class WindowCheck:
    """The tests and estimates of one window."""

    size: int
    p_values: dict  # test -> Bonferroni-corrected p-value (only the tests the model allows)
    alpha: float
    estimates: dict  # estimator -> estimated accuracy
    shares: np.ndarray  # (K,) the window's predicted-class shares
    reference_shares: np.ndarray  # (K,) the reference's
    class_p_values: np.ndarray  # (K,) the label test's per-class p-values, uncorrected

    @property
    def level(self) -> float:
        """The corrected level each family's p-value is compared with: ``alpha / tests``."""
        return self.alpha / max(len(self.p_values), 1)

    @property
    def drifted(self) -> bool:
        return any(p < self.level for p in self.p_values.values())

    def tests_fired(self) -> list[str]:
        return [name for name, p in self.p_values.items() if p < self.level]

    def moved_classes(self, labels, level: float | None = None) -> list[tuple[str, float, float]]:
        """``(label, reference share, window share)`` of the classes whose share moved: those
        the label test rejects at the corrected level, most significant first."""
        if level is None:
            level = self.level / len(labels)
        order = np.argsort(self.class_p_values)
        return [
            (labels[i], float(self.reference_shares[i]), float(self.shares[i]))
            for i in order
            if self.class_p_values[i] < level
        ]

    def to_dict(self, labels=None) -> dict:
        result = {
            "images": self.size,
            "drift": self.drifted,
            "alpha": self.alpha,
            "p_values": {name: round(p, 6) for name, p in self.p_values.items()},
            "tests_fired": self.tests_fired(),
            "estimated_accuracy": {name: round(v, 4) for name, v in self.estimates.items()},
        }
        if labels is not None:
            result["moved_classes"] = [
                {"label": label, "reference_share": round(a, 4), "share": round(b, 4)}
                for label, a, b in self.moved_classes(labels)
            ]
        return result


def knn_pvalue(reference: DriftReference, ood_scores) -> float | None:
    """The KS test of unknown-input scores (NaN ones left out) against the reference's; None
    for a model without a detector, or no scores."""
    if ood_scores is None or reference.sorted_ood is None:
        return None
    scores = np.asarray(ood_scores, dtype=np.float32)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return None
    statistic = ks_statistics(reference.sorted_ood, scores)
    return ks_pvalue(statistic, len(reference.sorted_ood), len(scores))


def label_test(reference: DriftReference, predicted: np.ndarray):
    """The predicted classes' shares (class indices, negative ones left out) against the
    reference's: ``(counts, per-class p-values, Bonferroni-corrected p-value or None)``."""
    classes = reference.num_classes
    known = np.asarray(predicted, dtype=np.int64)
    known = known[known >= 0]
    counts = np.bincount(known, minlength=classes).astype(np.float64)
    if not len(known):
        return counts, np.ones(classes), None
    class_p = proportion_pvalues(counts, len(known), reference.predicted_counts, reference.size)
    return counts, class_p, min(1.0, float(class_p.min()) * classes)


def estimate_accuracy(reference: DriftReference, top1: np.ndarray) -> dict:
    """Both label-free estimates of a window's top-1 scores."""
    top1 = np.asarray(top1, dtype=np.float32)
    return {ATC: reference.atc_estimate(top1), MEAN_CONFIDENCE: float(np.mean(top1))}


def check_window(
    reference: DriftReference,
    probabilities: np.ndarray,
    ood_scores: np.ndarray | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> WindowCheck:
    """Test a window of calibrated scores ``(n, K)`` (and its unknown-input scores ``(n,)``)
    against the reference, and estimate its accuracy."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    n, m, classes = len(probabilities), reference.size, reference.num_classes
    statistics = ks_statistics(reference.sorted_columns, probabilities)
    per_class = [ks_pvalue(value, m, n) for value in statistics]
    p_values = {BBSD: min(1.0, min(per_class) * classes)}
    knn = knn_pvalue(reference, ood_scores)
    if knn is not None:
        p_values[KNN] = knn
    counts, class_p, label_p = label_test(reference, probabilities.argmax(axis=1))
    p_values[LABEL] = label_p
    return WindowCheck(
        size=n,
        p_values=p_values,
        alpha=alpha,
        estimates=estimate_accuracy(reference, probabilities.max(axis=1)),
        shares=counts / n,
        reference_shares=reference.predicted_counts / m,
        class_p_values=class_p,
    )


def load_reference(
    folder: Path | None, name: str = REFERENCE_FILE, features: bool = True
) -> tuple[DriftReference | None, str]:
    """The reference ``name`` in a model's folder, or None and why not (a one-line reason)."""
    if not name:
        return None, "the model has no drift reference (trained before drift checks): train again"
    if folder is None:
        return None, "the model was not loaded from a folder"
    path = Path(folder) / name
    if not path.is_file():
        return None, f"{name} is missing from the model's folder: train again to re-create it"
    try:
        return DriftReference.load(path, features), ""
    except ReferenceError as error:
        return None, str(error)
