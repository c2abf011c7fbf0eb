"""What ``python -m training drift`` (:mod:`training.quality.drift_report`) reads and tests: the
artifact's contract and drift reference; the images, from a folder classified with the artifact's
``model.onnx`` (their full calibrated outputs) or from the prediction log (per prediction its
top-1 score, predicted class and unknown-input score, and the label that came back); and their
windows' tests and figures.

The log keeps no per-class scores, so the per-class test (``bbsd``) cannot run on it: its place
is taken by ``confidence``, a two-sample KS test of the top-1 score against the reference's.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from service.core.classifier import ModelLoadError, load_classifier, model_in_folder
from service.core.contract import ModelContract
from service.core.drift import (
    BBSD,
    ESTIMATORS,
    KNN,
    LABEL,
    REFERENCE_FILE,
    DriftReference,
    WindowCheck,
    check_window,
    estimate_accuracy,
    knn_pvalue,
    ks_pvalue,
    ks_statistics,
    label_test,
    load_reference,
)
from service.core.postprocessing import calibrated_predictions
from service.core.preprocessing import IMAGE_SUFFIXES, ImageError
from service.store.database import LogUnreadable, reading
from service.store.schema import labels, predictions
from training import artifacts
from training.command_config import DriftConfig
from training.data.sources import DataError
from training.quality.monitor import parse_period

# The log's stand-in for bbsd: a KS test of the top-1 calibrated score.
CONFIDENCE = "confidence"
DESCRIPTIONS = {
    BBSD: "KS test of each class's calibrated score, Bonferroni over the classes",
    CONFIDENCE: "KS test of the top-1 calibrated score",
    KNN: "KS test of the unknown-input score",
    LABEL: "the predicted classes' shares, a z-test per class, Bonferroni over the classes",
}
BBSD_ABSENT = (
    "the prediction log keeps only the top-k scores of each prediction, not the per-class "
    "scores the per-class test needs; the confidence test takes its place"
)
FOLDER, DATABASE = "folder", "database"
BATCH = 64  # images per model call in folder mode


@dataclass
class Observed:
    """What was read, one entry per image, in the windows' order."""

    kind: str  # FOLDER or DATABASE
    where: str  # the folder, or the log's URL as shown
    keys: list[str]  # a folder's files (relative to it), the log's request ids
    at: np.ndarray | None  # (N,) seconds since the epoch (the log); None for a folder
    top1: np.ndarray  # (N,) the top-1 calibrated score
    ood: np.ndarray | None  # (N,) the unknown-input score (NaN where not logged), or None
    predicted: np.ndarray  # (N,) the predicted class's index (-1: a label the model lacks)
    truth: np.ndarray  # (N,) the true class's index, -1 where no label came back
    probabilities: np.ndarray | None = None  # (N, K) a folder's calibrated scores
    skipped: int = 0  # a folder's files that could not be read as images

    def __len__(self) -> int:
        return len(self.top1)


# --- the checks --------------------------------------------------------------------------------


def check_logged(reference: DriftReference, top1, ood, predicted, alpha: float) -> WindowCheck:
    """The tests of a window of logged predictions: ``confidence`` (KS of the top-1 score against
    the reference's), ``knn`` (KS of the logged unknown-input scores, NULL ones left out) and
    ``label`` (the shares of ``predicted``, class indices; -1 left out), and the two
    estimates; a :class:`WindowCheck` as :func:`service.core.drift.check_window` gives."""
    top1 = np.asarray(top1, dtype=np.float32)
    reference_top1 = np.sort(reference.probabilities.max(axis=1))
    p_values = {
        CONFIDENCE: ks_pvalue(ks_statistics(reference_top1, top1), reference.size, len(top1))
    }
    knn = knn_pvalue(reference, ood)
    if knn is not None:
        p_values[KNN] = knn
    counts, class_p, label_p = label_test(reference, predicted)
    if label_p is not None:
        p_values[LABEL] = label_p
    return WindowCheck(
        size=len(top1),
        p_values=p_values,
        alpha=alpha,
        estimates=estimate_accuracy(reference, top1),
        shares=counts / max(counts.sum(), 1),
        reference_shares=reference.predicted_counts / reference.size,
        class_p_values=class_p,
    )


def check_part(
    reference: DriftReference, observed: Observed, chosen: slice, alpha: float
) -> WindowCheck:
    """The tests of the images ``chosen`` of ``observed``: the service's own on a folder's full
    outputs, the log's stand-ins on logged predictions."""
    ood = None if observed.ood is None else observed.ood[chosen]
    if observed.probabilities is not None:
        return check_window(reference, observed.probabilities[chosen], ood, alpha)
    return check_logged(reference, observed.top1[chosen], ood, observed.predicted[chosen], alpha)


def window_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive windows of ``size``; a last one of less than half a
    window joins the one before it (too few images for its own tests)."""
    bounds = [(start, min(start + size, count)) for start in range(0, count, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < size / 2:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def _digits(value: float) -> float:
    return float(f"{value:.4g}")


def _moment(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def part_figures(check: WindowCheck, observed: Observed, start: int, stop: int) -> dict:
    """A window's (or all images') figures: its tests and estimates, its time range or files,
    and, where labels came back, the live accuracy and each estimate's error."""
    figures = check.to_dict()
    # To four significant digits: to_dict's six decimals would make a small p-value 0.
    figures["p_values"] = {name: _digits(p) for name, p in check.p_values.items()}
    figures["level"] = _digits(check.level)
    figures["smallest_p_value"] = _digits(min(check.p_values.values(), default=1.0))
    if observed.at is not None:
        figures["from"], figures["to"] = _moment(observed.at[start]), _moment(observed.at[stop - 1])
        figures["from_at"], figures["to_at"] = (
            float(observed.at[start]),
            float(observed.at[stop - 1]),
        )
    else:
        figures["from"], figures["to"] = observed.keys[start], observed.keys[stop - 1]
    truth, predicted = observed.truth[start:stop], observed.predicted[start:stop]
    labelled = truth >= 0
    figures["labelled"] = int(labelled.sum())
    figures["accuracy"] = figures["estimate_error"] = None
    if labelled.any():
        accuracy = float(np.mean(predicted[labelled] == truth[labelled]))
        figures["accuracy"] = round(accuracy, 4)
        figures["estimate_error"] = {
            name: round(abs(value - accuracy), 4) for name, value in check.estimates.items()
        }
    return figures


# --- reading -----------------------------------------------------------------------------------


def read_artifact(config: DriftConfig) -> tuple[Path, ModelContract, DriftReference]:
    """The artifact folder, its contract and its drift reference; one-line errors."""
    folder = artifacts.resolve_artifact(config.artifact)
    try:
        contract = ModelContract.from_metadata(artifacts.read_json(folder / "metadata.json"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"--artifact {config.artifact}: metadata.json cannot be read ({error})"
        ) from None
    reference, why = load_reference(folder)
    if reference is None:
        path = folder / REFERENCE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"--artifact {config.artifact}: no {REFERENCE_FILE} in it (a model trained "
                "before drift references were written): train again to get one ('python -m "
                "training export' re-exports the model but cannot rebuild the reference)"
            )
        raise ModelLoadError(f"--artifact {config.artifact}: {why}: train again to rewrite it")
    if reference.num_classes != contract.num_classes:
        raise ModelLoadError(
            f"--artifact {config.artifact}: {REFERENCE_FILE} holds {reference.num_classes} "
            f"classes, the model {contract.num_classes}: train again to rewrite it"
        )
    return folder, contract, reference


def read_log(config: DriftConfig, contract: ModelContract) -> tuple[Observed, str]:
    """The period's predictions of the model version, ordered by time, with their labels; and
    the version read."""
    url = config.database or os.environ.get("DATABASE_URL", "")
    version = config.model_version or contract.version
    cutoff = time.time() - parse_period(config.since)
    logged = predictions.c
    chosen = (logged.at >= cutoff) & (logged.model_version == version)
    try:
        with reading(url) as (connection, shown_url):
            rows = connection.execute(
                select(
                    logged.request_id,
                    logged.at,
                    logged.predicted,
                    logged.score,
                    logged.ood_score,
                    labels.c.label,
                    labels.c.new_class,
                )
                .select_from(predictions)
                .outerjoin(labels, labels.c.request_id == logged.request_id)
                .where(chosen)
                .order_by(logged.at, logged.request_id)
            ).all()
            others = []
            if not rows:
                others = sorted(
                    connection.execute(
                        select(logged.model_version).where(logged.at >= cutoff).distinct()
                    ).scalars()
                )
    except LogUnreadable as error:
        raise DataError(f"--database {error}") from None
    if not rows:
        hint = (
            f"; it holds version {', '.join(others)} then: name one with --model-version"
            if others
            else ": let the service answer some requests first, or widen --since"
        )
        raise DataError(
            f"--database {shown_url}: no predictions of model version {version} in the last "
            f"{config.since}{hint}"
        )
    index = {label: position for position, label in enumerate(contract.labels)}
    truth = [
        -1 if label is None or new_class else index.get(label, -1) for *_, label, new_class in rows
    ]
    ood = [math.nan if row.ood_score is None else row.ood_score for row in rows]
    observed = Observed(
        kind=DATABASE,
        where=shown_url,
        keys=[row.request_id for row in rows],
        at=np.array([row.at for row in rows], dtype=np.float64),
        top1=np.array([row.score for row in rows], dtype=np.float32),
        ood=np.array(ood, dtype=np.float32) if contract.has_detector else None,
        predicted=np.array([index.get(row.predicted, -1) for row in rows], dtype=np.int64),
        truth=np.array(truth, dtype=np.int64),
    )
    return observed, version


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder``, recursively, in sorted order (as the batch CLI finds
    them)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def read_folder(config: DriftConfig, artifact: Path) -> Observed:
    """A folder's images classified with the artifact's model: their full calibrated outputs.
    An image in a sub-folder named after a class counts as labelled with it."""
    folder = Path(config.folder)
    if not folder.is_dir():
        raise DataError(f"--folder {folder} is not a folder")
    paths = image_files(folder)
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"--folder {folder} holds no image files ({suffixes})")
    classifier = load_classifier(model_in_folder(artifact, f"--artifact {config.artifact}"))
    contract = classifier.contract
    index = {label: position for position, label in enumerate(contract.labels)}
    keys, truth, batch, probabilities, ood, skipped = [], [], [], [], [], 0

    def flush() -> None:
        if batch:
            outputs = classifier.predict(np.stack(batch))
            answered = calibrated_predictions(outputs.logits, outputs.ood_scores, contract)
            probabilities.append(answered.probabilities)
            if answered.ood_scores is not None:
                ood.append(answered.ood_scores)
            batch.clear()

    for path in paths:
        try:
            batch.append(classifier.preprocess(path.read_bytes()))
        except (ImageError, OSError):
            skipped += 1
            continue
        key = path.relative_to(folder).as_posix()
        keys.append(key)
        parts = key.split("/")
        truth.append(index.get(parts[0], -1) if len(parts) > 1 else -1)
        if len(batch) == BATCH:
            flush()
    flush()
    if not keys:
        raise DataError(f"--folder {folder}: none of its {len(paths)} image files can be read")
    scores = np.concatenate(probabilities)
    return Observed(
        kind=FOLDER,
        where=str(folder),
        keys=keys,
        at=None,
        top1=scores.max(axis=1),
        ood=np.concatenate(ood) if ood else None,
        predicted=scores.argmax(axis=1),
        truth=np.array(truth, dtype=np.int64),
        probabilities=scores,
        skipped=skipped,
    )


def drift_figures(
    config: DriftConfig, contract: ModelContract, reference: DriftReference, observed: Observed
) -> dict:
    """The figures: the reference, the source, each window and all the images at once."""
    tests = [BBSD, KNN, LABEL] if observed.probabilities is not None else [CONFIDENCE, KNN, LABEL]
    if observed.ood is None or reference.sorted_ood is None:
        tests.remove(KNN)
    windows = []
    for number, (start, stop) in enumerate(window_bounds(len(observed), config.window), 1):
        check = check_part(reference, observed, slice(start, stop), config.alpha)
        windows.append({"window": number, **part_figures(check, observed, start, stop)})
    whole = check_part(reference, observed, slice(0, len(observed)), config.alpha)
    overall = part_figures(whole, observed, 0, len(observed))
    overall["moved_classes"] = [
        {"label": label, "reference_share": round(a, 4), "share": round(b, 4)}
        for label, a, b in whole.moved_classes(list(contract.labels))
    ]
    errors = [window["estimate_error"] for window in windows if window["estimate_error"]]
    overall["mean_window_error"] = (
        {name: round(float(np.mean([e[name] for e in errors])), 4) for name in ESTIMATORS}
        if errors
        else None
    )
    drifted = sum(window["drift"] for window in windows)
    figures = {
        "model": {"name": contract.name, "version": contract.version},
        "artifact": str(config.artifact),
        "reference": {
            "images": reference.size,
            "validation_accuracy": round(reference.accuracy, 4),
            "atc_threshold": round(reference.atc_threshold, 6),
            "mean_top1": round(float(np.mean(reference.probabilities.max(axis=1))), 4),
            "unknown_input_scores": reference.sorted_ood is not None,
        },
        "source": {
            "kind": observed.kind,
            "where": observed.where,
            "images": len(observed),
            "labelled": int((observed.truth >= 0).sum()),
            "skipped": observed.skipped,
        },
        "tests": {name: DESCRIPTIONS[name] for name in tests},
        "absent": {} if BBSD in tests else {BBSD: BBSD_ABSENT},
        "alpha": config.alpha,
        "window": config.window,
        "windows": windows,
        "overall": overall,
        "drifted_windows": drifted,
        "drifted_share": round(drifted / len(windows), 4),
    }
    if observed.kind == DATABASE:
        figures["source"].update(since=config.since, model_version=config.model_version)
    return figures
