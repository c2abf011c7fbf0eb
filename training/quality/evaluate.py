"""Held-out evaluation: accuracy, balanced accuracy, per-class precision/recall/F1, confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
)


def evaluation_report(true_labels: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of predictions ``argmax(logits)`` against ``true_labels`` (both integer-encoded)."""
    predicted = np.argmax(logits, axis=-1)
    positions = list(range(len(class_names)))
    per_class = classification_report(
        true_labels,
        predicted,
        labels=positions,
        target_names=class_names,
        output_dict=True,
        zero_division=0,
    )
    return {
        "test_accuracy": float(accuracy_score(true_labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(true_labels, predicted)),
        "num_test_images": int(len(true_labels)),
        "per_class": {
            name: {
                "precision": per_class[name]["precision"],
                "recall": per_class[name]["recall"],
                "f1": per_class[name]["f1-score"],
                "support": int(per_class[name]["support"]),
            }
            for name in class_names
        },
        "confusion_matrix": confusion_matrix(true_labels, predicted, labels=positions).tolist(),
        "labels": class_names,
    }


def format_report(report: dict) -> str:
    """The per-class table printed at the end of a run."""
    width = max(12, *(len(name) for name in report["per_class"]))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<{width}} {row['precision']:>9.3f} {row['recall']:>9.3f} {row['f1']:>9.3f} "
            f"{row['support']:>8d}"
        )
    lines.append(
        f"test accuracy {report['test_accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f} on {report['num_test_images']} held-out images"
    )
    return "\n".join(lines)
