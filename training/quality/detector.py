"""The unknown-input detector (out-of-distribution detection): is an input like the training
images at all?

The detector reads an image's features at several depths: the spatial mean of each convolution
block's output (for a backbone, its pooled features). For each layer, the distance of the
L2-normalised features to their k-th nearest neighbour among a bank of training images'
normalised features (Sun et al., 2022), divided by its typical value on training images; the
score is the mean over layers, a feature ensemble in the manner of Lee et al. (2018) with equal
weights. Shallow layers see strokes and textures, deep ones shapes: together they flag inputs far
from the training data (photos, noise, blank images) and near-miss inputs, close to it but of
none of its classes (real handwritten digits sent to the animals model). A backbone's one layer
gets the Mahalanobis distance to the nearest class mean (shared Ledoit-Wolf covariance) as a
second part. Everything is fitted on the training images' features only; the threshold is set
on the validation split so that at least ``acceptance`` of new in-distribution images pass,
with ``THRESHOLD_CONFIDENCE`` (90%) confidence. No outlier image is ever used to fit either. The
export puts the score in the ONNX graph as a second output, ``ood_score``, so every client gets
it and the service needs no TensorFlow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import THRESHOLD_CONFIDENCE

log = logging.getLogger(__name__)


OOD_OUTPUT_NAME = "ood_score"
DETECTOR_FILE = "ood_detector.npz"
# The k-th nearest of a bank of training images' features (Sun et al., 2022): at most
# KNN_BANK_ROWS images, drawn at random from each class, and at most KNN_BANK_BYTES of float64
# rows. The bank's size is the score's cost (benchmarks/detectors.py measures it: onnxruntime at
# batch 1 took 160 us with no score, 200 us with 2,000 rows of the penultimate layer, 300 us
# with all 7,000 training images of the built-in set, which flagged no more real digits).
KNN_K = 5
KNN_BANK_ROWS = 2000
KNN_BANK_BYTES = 4 * 1024**2
# Each part's score is divided by this quantile of its scores on training images, so the parts
# speak in one unit ("times a typical training image's score") before they are combined.
PART_SCALE_QUANTILE = 0.95
# Training images outside the bank enough to set the nearest-neighbour scales on.
MIN_LEFT_OUT = 200
# tf.math.l2_normalize's floor on the squared norm: an all-zero feature vector stays finite.
NORM_EPSILON = 1e-12


@dataclass
class UnknownInputDetector:
    """The unknown-input score of an image's features: the spatial means of L layers' outputs,
    concatenated, ``(N, sum(widths))`` (for the CNN, the output of each convolution block, the
    last of which is the penultimate layer; for a backbone, its pooled features alone).

    ``score = mean over layers l of knn_l / knn_scales[l]``, where ``knn_l`` is the distance of
    layer l's L2-normalised features to their k-th nearest neighbour among the bank's
    L2-normalised training features, ``sqrt(2 - 2 s_k)`` with ``s_k`` the k-th largest cosine
    similarity (Sun et al., 2022), taken at every block as in Lee et al.'s (2018) feature
    ensemble, with equal weights (no outlier data to weigh them on). With ``projection``, the
    score is the larger of that and ``mahalanobis / mahalanobis_scale``, the Mahalanobis
    distance of the last layer's features to the nearest class mean, ``min_k sqrt((x - mu_k)^T
    P (x - mu_k))`` with ``P = W W^T`` stored as ``W`` (D, D) and the projected means ``mu_k W``
    (K, D): one matrix product, K differences, no inverse. A detector without a bank (artifacts
    from before the nearest-neighbour part) is the Mahalanobis distance alone, in its units.
    """

    widths: tuple[int, ...] = ()  # features of each layer, in order
    bank: np.ndarray | None = None  # (M, sum(widths)) float64, each layer's slice of unit length
    knn_scales: tuple[float, ...] = ()
    k: int = KNN_K
    projection: np.ndarray | None = None  # (D, D) float32, D = widths[-1]
    projected_means: np.ndarray | None = None  # (K, D) float32
    mahalanobis_scale: float = 1.0
    threshold: float = float("inf")

    @property
    def method(self) -> str:
        parts = []
        if self.bank is not None:
            parts.append(
                f"mean over {len(self.widths)} layer(s) of the k-nearest-neighbour distance of "
                f"normalised features (k = {self.k} of {len(self.bank)} training images), each "
                f"over its training {PART_SCALE_QUANTILE:.0%} quantile"
            )
        if self.projection is not None:
            parts.append("Mahalanobis distance of the penultimate layer (shared covariance)")
        return ", the larger of it and the ".join(parts)

    def layers(self, features: np.ndarray) -> list[np.ndarray]:
        """``(N, sum(widths))`` -> one ``(N, width)`` array per layer."""
        edges = np.cumsum((0, *self.widths))
        return [features[:, start:end] for start, end in zip(edges[:-1], edges[1:], strict=True)]

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """``(N, sum(widths))`` -> ``(N,)`` float32 distances of the last layer to the nearest
        class mean, as the graph computes them."""
        last = np.asarray(features, dtype=np.float32)[:, -self.projection.shape[0] :]
        projected = last @ self.projection
        differences = projected[:, np.newaxis, :] - self.projected_means[np.newaxis]
        squared = np.sum(differences * differences, axis=2)
        return np.sqrt(squared.min(axis=1)).astype(np.float32)

    def knn(self, features: np.ndarray, skip: int = 0) -> list[np.ndarray]:
        """Each layer's ``(N,)`` float32 distance of normalised features to their k-th nearest
        in the bank (the ``k + skip``-th, to leave an image itself out when it is in the bank).
        In float64, as the graph does: near neighbours' similarities are close to 1, and
        ``2 - 2 s`` in float32 would keep only a few digits of their distance."""
        nearest = self.k + skip
        distances = []
        for part, bank in zip(self.layers(features), self.layers(self.bank), strict=True):
            similarities = normalise(part) @ bank.T
            kth = -np.partition(-similarities, nearest - 1, axis=1)[:, nearest - 1]
            # |a - b| of unit vectors a, b is sqrt(2 - 2 a.b).
            distances.append(np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0)).astype(np.float32))
        return distances

    def knn_score(self, features: np.ndarray, skip: int = 0) -> np.ndarray:
        """The nearest-neighbour part: the mean over layers of each distance over its scale."""
        scaled = [
            distance / np.float32(scale)
            for distance, scale in zip(self.knn(features, skip), self.knn_scales, strict=True)
        ]
        return (np.sum(scaled, axis=0) / np.float32(len(scaled))).astype(np.float32)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``(N, sum(widths))`` features -> ``(N,)`` float32 unknown-input scores, as the graph
        computes them."""
        score = None
        if self.bank is not None:
            score = self.knn_score(features)
        if self.projection is not None:
            distance = self.mahalanobis(features) / np.float32(self.mahalanobis_scale)
            score = distance if score is None else np.maximum(score, distance)
        return score.astype(np.float32)

    def save(self, path: Path) -> None:
        arrays = {"threshold": np.float64(self.threshold), "k": np.int64(self.k)}
        arrays["widths"] = np.asarray(self.widths, dtype=np.int64)
        if self.bank is not None:
            arrays |= {"bank": self.bank, "knn_scales": np.asarray(self.knn_scales)}
        if self.projection is not None:
            arrays |= {
                "projection": self.projection,
                "projected_means": self.projected_means,
                "mahalanobis_scale": np.float64(self.mahalanobis_scale),
            }
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> UnknownInputDetector:
        with np.load(path) as stored:
            files = set(stored.files)
            projection = stored["projection"] if "projection" in files else None
            widths = stored["widths"] if "widths" in files else [projection.shape[0]]
            return cls(
                widths=tuple(int(width) for width in widths),
                bank=stored["bank"] if "bank" in files else None,
                knn_scales=tuple(float(v) for v in stored["knn_scales"])
                if "knn_scales" in files
                else (),
                k=int(stored["k"]) if "k" in files else KNN_K,
                projection=projection,
                projected_means=stored["projected_means"] if projection is not None else None,
                mahalanobis_scale=float(stored["mahalanobis_scale"])
                if "mahalanobis_scale" in files
                else 1.0,
                threshold=float(stored["threshold"]),
            )


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float64, as ``tf.math.l2_normalize`` does."""
    features = np.asarray(features, dtype=np.float64)
    squared = np.sum(features * features, axis=1, keepdims=True)
    return features / np.sqrt(np.maximum(squared, NORM_EPSILON))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Class means and a shared, shrunk covariance of training embeddings: a detector of the
    Mahalanobis part alone, in distance units (scale 1)."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    means = np.stack(
        [
            features[labels == k].mean(axis=0) if np.any(labels == k) else features.mean(axis=0)
            for k in range(num_classes)
        ]
    )
    centred = features - means[labels]
    precision = LedoitWolf().fit(centred).precision_
    # P = W W^T: Cholesky of the (symmetric, positive definite) precision matrix.
    projection = np.linalg.cholesky((precision + precision.T) / 2)
    return UnknownInputDetector(
        widths=(features.shape[1],),
        projection=projection.astype(np.float32),
        projected_means=(means @ projection).astype(np.float32),
    )


def bank_indices(
    labels: np.ndarray,
    width: int,
    seed: int,
    rows: int = KNN_BANK_ROWS,
    budget: int = KNN_BANK_BYTES,
) -> np.ndarray:
    """The training embeddings kept in the bank: all of them when there are at most ``rows``
    and they fit in ``budget`` bytes of float64 rows of ``width``, else a random stratified
    share of each class."""
    rows = max(min(rows, budget // (8 * width)), 1)
    if len(labels) <= rows:
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(
        np.arange(len(labels)), train_size=rows, stratify=labels, random_state=seed
    )
    return np.sort(kept)


def fit_detector(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    widths: tuple[int, ...] | None = None,
    seed: int = 0,
    k: int = KNN_K,
    mahalanobis: bool = False,
) -> UnknownInputDetector:
    """The unknown-input detector of training images' features ``(N, sum(widths))`` (default:
    one layer): the bank of the nearest-neighbour part and each layer's scale, the 95% quantile
    of its distances for training images left out of the bank (or, when all are in it, each
    one's distance to the bank without itself); with ``mahalanobis``, also the Mahalanobis part
    of the last layer, scaled by its training 95% quantile. The threshold is set later, on the
    validation split (:func:`threshold_for`)."""
    features = np.asarray(features, dtype=np.float32)
    widths = tuple(widths or (features.shape[1],))
    if mahalanobis:
        detector = fit_mahalanobis(features[:, -widths[-1] :], labels, num_classes)
        detector.widths = widths
        detector.mahalanobis_scale = float(
            np.quantile(detector.mahalanobis(features), PART_SCALE_QUANTILE)
        )
    else:
        detector = UnknownInputDetector(widths=widths)
    kept = bank_indices(labels, features.shape[1], seed)
    detector.bank = np.concatenate([normalise(part) for part in detector.layers(features[kept])], 1)
    detector.k = int(min(k, max(len(kept) - 1, 1)))
    left_out = np.setdiff1d(np.arange(len(features)), kept)
    if len(left_out) >= MIN_LEFT_OUT:
        distances = detector.knn(features[left_out])
    else:
        distances = detector.knn(features[kept], skip=1)
    detector.knn_scales = tuple(
        float(max(np.quantile(distance, PART_SCALE_QUANTILE), 1e-6)) for distance in distances
    )
    return detector


def threshold_for(validation_scores: np.ndarray, acceptance: float) -> float:
    """The score at or below which at least ``acceptance`` of new images like the validation
    split fall, with :data:`THRESHOLD_CONFIDENCE` confidence.

    The plain ``acceptance`` quantile of the validation scores accepts that share only on
    average: estimated from 1,000 images it is off by about 0.7 points either way, so half of
    all runs would flag more than promised. Instead this takes the smallest order statistic
    whose coverage of new scores, ``Beta(k, n + 1 - k)``, is at least ``acceptance`` with that
    confidence (training-conditional conformal prediction, Vovk 2012).
    """
    from scipy.stats import beta

    ordered = np.sort(np.asarray(validation_scores, dtype=np.float64))
    n = len(ordered)
    for k in range(max(1, int(np.floor(acceptance * n))), n + 1):
        if beta.sf(acceptance, k, n + 1 - k) >= THRESHOLD_CONFIDENCE:
            return float(ordered[k - 1])
    return float(ordered[-1])
