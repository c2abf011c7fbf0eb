"""``--evaluate``: the accuracy and confusion matrix of a run against the folder each file sits
in, counted as rows stream past (memory stays flat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.cli.writers import first_label, is_flagged


class Tally:
    """Counts of a run: classified and failed, and for --evaluate the true, top and unknown of
    each file in a folder named after a label."""

    def __init__(self, labels: list[str], evaluate: bool) -> None:
        self.labels, self.evaluate = labels, evaluate
        self.index = {label: position for position, label in enumerate(labels)}
        self.classified = self.failed = 0
        self.truth: list[int] = []
        self.top: list[int] = []
        self.unknown: list[bool] = []

    @property
    def files(self) -> int:
        return self.classified + self.failed

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("error"):
                self.failed += 1
                continue
            self.classified += 1
            folder = Path(row["path"]).parent.name
            if self.evaluate and folder in self.index:
                self.truth.append(self.index[folder])
                self.top.append(self.index[first_label(row)])
                self.unknown.append(is_flagged(row))


def evaluation(tally: Tally) -> dict:
    """Against the parent folder name of each classified file: the accuracy and confusion
    matrix of the top class (the closest class for an input answered ``unknown``), how many
    were answered ``unknown``, and the accuracy of the others."""
    labels = tally.labels
    if not tally.truth:
        return {
            "images": 0,
            "accuracy": None,
            "unknown": 0,
            "accuracy_of_known": None,
            "confusion_matrix": [],
            "labels": labels,
        }
    truth, predicted = np.array(tally.truth), np.array(tally.top)
    unknown = np.array(tally.unknown, dtype=bool)
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    known = ~unknown
    return {
        "images": len(truth),
        "accuracy": float(np.mean(truth == predicted)),
        "unknown": int(unknown.sum()),
        "accuracy_of_known": float(np.mean(truth[known] == predicted[known]))
        if known.any()
        else None,
        "confusion_matrix": matrix.tolist(),
        "labels": labels,
    }


def format_evaluation(result: dict) -> str:
    if not result["images"]:
        return "evaluate: no classified image sits in a folder named after one of the labels"
    labels = result["labels"]
    width = max(len(label) for label in labels) + 1
    lines = [
        f"accuracy {result['accuracy']:.4f} on {result['images']} images "
        "(true label = parent folder name; top class)",
        f"unknown: {result['unknown']} of {result['images']} images "
        f"({result['unknown'] / result['images']:.1%}) flagged as unlike the training images"
        + (
            f"; accuracy of the others {result['accuracy_of_known']:.4f}"
            if result["accuracy_of_known"] is not None
            else ""
        ),
        "confusion matrix (rows: true, columns: predicted)",
        " " * width + " ".join(f"{label[:6]:>6}" for label in labels),
    ]
    for label, counts in zip(labels, result["confusion_matrix"], strict=True):
        lines.append(f"{label:<{width}}" + " ".join(f"{count:>6d}" for count in counts))
    return "\n".join(lines)
