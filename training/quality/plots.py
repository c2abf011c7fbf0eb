"""Training plots: loss and accuracy per epoch (training and validation), and confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def fine_tuning_start(history: dict) -> int | None:
    """The first epoch of phase 2 of a backbone run (1-based), or None."""
    phases = history.get("phase", [])
    return phases.index("fine_tune") + 1 if "fine_tune" in phases else None


def plot_metric(history: dict[str, list[float]], metric: str, path: Path, title: str) -> None:
    """One curve per split of ``metric`` against the epoch, as the course's training plots, with
    a marker where fine-tuning starts in a backbone run."""
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = np.arange(1, len(history[metric]) + 1)
    axes.plot(epochs, history[metric], marker="o", label=f"training {metric}")
    if f"val_{metric}" in history:
        axes.plot(epochs, history[f"val_{metric}"], marker="o", label=f"validation {metric}")
    start = fine_tuning_start(history)
    if start is not None:
        axes.axvline(start - 0.5, color="grey", linestyle="--", label="fine-tuning starts")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_training(history: dict[str, list[float]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    loss, accuracy = folder / "loss.png", folder / "accuracy.png"
    plot_metric(history, "loss", loss, "Loss per epoch")
    plot_metric(history, "accuracy", accuracy, "Accuracy per epoch")
    return [loss, accuracy]


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    size = max(5, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    axes.set_title("Confusion matrix (held-out test set)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_reliability(calibration: dict, path: Path) -> None:
    """Reliability diagram of the test split: accuracy against top-1 confidence per bin, before
    and after temperature scaling; the diagonal is perfect calibration."""
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for key, label in (
        ("reliability_before", f"before (ECE {calibration['ece_before']:.3f})"),
        (
            "reliability_after",
            f"after, T = {calibration['temperature']:.2f} (ECE {calibration['ece_after']:.3f})",
        ),
    ):
        table = calibration[key]
        points = [
            (confidence, accuracy)
            for confidence, accuracy in zip(table["confidence"], table["accuracy"], strict=True)
            if confidence is not None
        ]
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("top-1 confidence")
    axes.set_ylabel("accuracy")
    axes.set_title("Reliability (held-out test set)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
