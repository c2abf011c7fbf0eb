"""The audit: one pass over the images, duplicates, odd images, out-of-fold predictions, label
issues, unknown-looking images and class balance, gathered into an :class:`AuditResult`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from service.core.preprocessing import ImageSpec
from training.audit.labels import LabelIssues, find_label_issues
from training.audit.predictions import OutOfFold, from_embeddings, from_quick_model
from training.data.duplicates import Duplicates, label_conflicts
from training.data.scan import Inventory, Scanned, odd_images, scan_images
from training.data.sources import LabelledImages

log = logging.getLogger(__name__)

# Images whose unknown-input score lies above Q3 + FENCE * IQR of all scores are reported as
# looking like no class: twice Tukey's far-out fence, since at 3 IQR the built-in set with 10
# planted photos gave 46 images, the 10 photos and 36 silhouettes (python -m benchmarks.audit).
FENCE = 6.0
# Below this out-of-fold accuracy (or twice chance, if higher) the model is too weak to judge
# labels: its suspects are reported as unreliable and nothing is excluded.
MIN_OOF_ACCURACY = 0.5
# A class this many times larger than the smallest one is reported as imbalance.
IMBALANCE_RATIO = 1.5


@dataclass
class AuditResult:
    source: str
    class_names: list[str]
    labels: np.ndarray  # (N,) int, index into class_names
    scanned: Scanned
    odd: list[dict]
    conflicts: list[np.ndarray]
    oof: OutOfFold | None = None
    issues: LabelIssues | None = None
    outliers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    outlier_threshold: float | None = None
    seconds: dict = field(default_factory=dict)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def inventory(self) -> Inventory:
        return self.scanned.inventory

    @property
    def duplicates(self) -> Duplicates:
        return self.scanned.duplicates

    @property
    def oof_accuracy(self) -> float | None:
        """Accuracy of the out-of-fold predictions against the given labels."""
        if self.oof is None:
            return None
        return float(np.mean(self.oof.probabilities.argmax(axis=1) == self.labels))

    @property
    def labels_judged(self) -> bool:
        """Whether the out-of-fold model is good enough for its label suspects to count."""
        needed = max(MIN_OOF_ACCURACY, 2 / max(len(self.class_names), 1))
        return self.oof is not None and self.oof_accuracy >= needed

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist(), strict=True))

    def imbalance(self) -> float:
        counts = [count for count in self.class_counts().values() if count]
        return max(counts) / min(counts)

    def blocking(self) -> list[str]:
        """What ``--audit fail`` stops on: duplicates under different labels, unreadable files."""
        problems = []
        if self.conflicts:
            first = self.conflicts[0]
            files = " and ".join(self.inventory.keys[i] for i in first[:2])
            problems.append(
                f"{len(self.conflicts)} group(s) of duplicates filed under different labels "
                f"(e.g. {files})"
            )
        if self.inventory.unreadable:
            problems.append(
                f"{len(self.inventory.unreadable)} unreadable file(s) "
                f"(e.g. {self.inventory.unreadable[0]['file']})"
            )
        return problems


def outlier_fence(scores: np.ndarray) -> float:
    """Tukey's far-out fence of the scores: Q3 + FENCE * (Q3 - Q1)."""
    first, third = np.percentile(scores, [25, 75])
    return float(third + FENCE * (third - first))


def out_of_fold(
    inputs_or_features: np.ndarray,
    labels: np.ndarray,
    spec: ImageSpec | None,
    classes: int,
    folds: int,
    epochs: int,
    seed: int,
) -> OutOfFold:
    """Out-of-fold predictions from embeddings (``spec`` None) or model inputs."""
    if spec is None:
        return from_embeddings(inputs_or_features, labels, classes, folds, seed)
    return from_quick_model(inputs_or_features, labels, spec, classes, folds, epochs, seed)


def audit(
    images: LabelledImages,
    class_names: list[str],
    labels: np.ndarray,
    scanned: Scanned | None = None,
    predict=None,
) -> AuditResult:
    """Audit ``images`` (labels integer-encoded in ``class_names``).

    Args:
        scanned: the model-free part, if already done (the training job's split needs it).
        predict: ``() -> OutOfFold``, the out-of-fold predictions; None skips label issues and
            unknown-looking images.
    """
    scanned = scanned or scan_images(images)
    result = AuditResult(
        source=images.source,
        class_names=list(class_names),
        labels=np.asarray(labels, dtype=np.int64),
        scanned=scanned,
        odd=odd_images(scanned.inventory),
        conflicts=label_conflicts(scanned.duplicates.near, np.asarray(labels)),
        seconds={"scan and duplicates": round(scanned.seconds, 2)},
    )
    if predict is not None:
        add_predictions(result, predict)
    return result


def add_predictions(result: AuditResult, predict) -> AuditResult:
    """Label issues and unknown-looking images from ``predict()``'s out-of-fold predictions."""
    if len(np.unique(result.labels)) < 2:
        return result
    started = time.monotonic()
    result.oof = predict()
    result.seconds["out-of-fold predictions"] = round(time.monotonic() - started, 2)
    result.issues = find_label_issues(result.oof.probabilities, result.labels)
    result.outlier_threshold = outlier_fence(result.oof.ood_scores)
    above = np.flatnonzero(result.oof.ood_scores > result.outlier_threshold)
    result.outliers = above[np.argsort(-result.oof.ood_scores[above], kind="stable")]
    return result
