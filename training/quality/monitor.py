"""``python -m training monitor``: live accuracy from the prediction log (:mod:`service.store`).

The figures come from the log that every replica writes, not from a pod's counters, so they do
not depend on how long a pod has lived or how many there are:

- the labelled predictions of the period, their accuracy and confusion matrix (a label naming a
  class the serving model did not know is counted apart, as a new class);
- the calibration of their top-1 scores: the expected calibration error over ten score bins;
- the label coverage: labelled predictions over all predictions of the period;
- the labels still waiting for their prediction (pending), and those that waited out the
  retention (orphaned).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter

import numpy as np
import sqlalchemy
from sqlalchemy import func, select

from service.store.database import LogUnreadable, reading
from service.store.schema import labels, predictions
from training.command_config import MonitorConfig
from training.config import ConfigError
from training.data.sources import DataError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ECE_BINS = 10


def parse_period(text: str) -> float:
    """Seconds of a period such as ``7d``, ``12h``, ``30m`` or ``90s``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise ConfigError(f"--since {text!r}: use a number and s, m, h or d, e.g. 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def top1_ece(scores: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """The count-weighted mean |accuracy - mean score| over equal-width score bins."""
    if not len(scores):
        return 0.0
    which = np.minimum((scores * bins).astype(int), bins - 1)
    gap = 0.0
    for index in range(bins):
        chosen = which == index
        if chosen.any():
            gap += chosen.sum() * abs(correct[chosen].mean() - scores[chosen].mean())
    return round(float(gap / len(scores)), 5)


def live_figures(config: MonitorConfig) -> dict:
    """The monitor's figures for ``config``'s database and period."""
    url = config.database or os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError("--database: name the prediction log (the service's DATABASE_URL)")
    cutoff = time.time() - parse_period(config.since)
    recent = predictions.c.at >= cutoff
    if config.model_version:
        recent = recent & (predictions.c.model_version == config.model_version)
    has_prediction = sqlalchemy.exists().where(predictions.c.request_id == labels.c.request_id)
    try:
        with reading(url) as (connection, shown_url):
            total = connection.execute(select(func.count()).where(recent)).scalar()
            rows = connection.execute(
                select(
                    predictions.c.predicted,
                    predictions.c.score,
                    labels.c.new_class,
                    labels.c.label,
                )
                .join(labels, labels.c.request_id == predictions.c.request_id)
                .where(recent)
            ).all()
            classes = set(
                connection.execute(
                    select(predictions.c.predicted).where(recent).distinct()
                ).scalars()
            )
            pending = connection.execute(
                select(func.count())
                .select_from(labels)
                .where(
                    labels.c.orphaned_at.is_(None), ~has_prediction, labels.c.received_at >= cutoff
                )
            ).scalar()
            orphaned = connection.execute(
                select(func.count()).select_from(labels).where(labels.c.orphaned_at >= cutoff)
            ).scalar()
    except LogUnreadable as error:
        raise DataError(f"--database {error}") from None
    known = [(p, score, label) for p, score, new_class, label in rows if not new_class]
    names = sorted(classes | {label for _, _, label in known})
    confusion = Counter((label, predicted) for predicted, _, label in known)
    scores = np.array([score for _, score, _ in known], dtype=float)
    correct = np.array([label == predicted for predicted, _, label in known], dtype=float)
    return {
        "database": shown_url,
        "since": config.since,
        "model_version": config.model_version or None,
        "predictions": total,
        "labelled": len(rows),
        "coverage": round(len(rows) / total, 5) if total else 0.0,
        "new_class": len(rows) - len(known),
        "accuracy": round(float(correct.mean()), 5) if len(known) else None,
        "ece": top1_ece(scores, correct) if len(known) else None,
        "classes": names,
        "confusion": [[confusion[(actual, predicted)] for predicted in names] for actual in names],
        "pending": pending,
        "orphaned": orphaned,
    }


def format_report(figures: dict) -> str:
    """The figures as the lines the command prints."""
    accuracy = "n/a" if figures["accuracy"] is None else f"{figures['accuracy']:.4f}"
    ece = "n/a" if figures["ece"] is None else f"{figures['ece']:.4f}"
    lines = [
        f"prediction log {figures['database']}, the last {figures['since']}"
        + (f", model version {figures['model_version']}" if figures["model_version"] else ""),
        f"predictions: {figures['predictions']}, labelled: {figures['labelled']} "
        f"(coverage {figures['coverage']:.2%}), new-class labels: {figures['new_class']}",
        f"accuracy: {accuracy}   calibration (ECE, top-1): {ece}",
        f"labels pending: {figures['pending']}   orphaned: {figures['orphaned']}",
    ]
    names = figures["classes"]
    if names and figures["labelled"]:
        width = max(6, *(len(name) for name in names))
        lines.append("confusion (rows: true label, columns: predicted)")
        lines.append(" " * width + " " + " ".join(f"{name:>{width}}" for name in names))
        for name, counts in zip(names, figures["confusion"], strict=True):
            lines.append(f"{name:>{width}} " + " ".join(f"{count:>{width}}" for count in counts))
    return "\n".join(lines)
