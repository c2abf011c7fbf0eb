"""What a training run prints as it goes, and what it records of itself in ``metadata.json``."""

from __future__ import annotations

import platform
from datetime import UTC, datetime

import numpy as np

from service.core.contract import ModelContract
from training import artifacts
from training.config import TrainConfig
from training.data.pipelines import iterations_per_epoch
from training.data.prepare import PreparedData
from training.fit.fitting import Fitted, images_per_second


def format_label_table(class_names: list[str], labels: np.ndarray) -> str:
    """The class-label file as the course shows it: integer label, class name, image count."""
    counts = np.bincount(labels, minlength=len(class_names))
    lines = [f"{'label':>5}  {'class':<16} {'images':>7}"]
    lines += [
        f"{index:>5}  {name:<16} {counts[index]:>7d}" for index, name in enumerate(class_names)
    ]
    return "\n".join(lines)


def data_lines(config: TrainConfig, data: PreparedData, class_weight: dict | None) -> list[str]:
    """The data a run trains on: its source, the label table, the splits, the class weights."""
    splits = data.splits
    lines = [f"data: {data.images.source}, {len(data.images)} images, {data.num_classes} classes"]
    if data.images.skipped:
        lines.append(
            f"skipped {len(data.images.skipped)} unreadable file(s); see the warnings above"
        )
    lines.append(format_label_table(data.class_names, data.labels))
    lines.append(
        f"splits: {len(splits.train)} train, {len(splits.validation)} validation, "
        f"{len(splits.test)} test (stratified, seed {config.seed}); model input {data.spec.shape}"
    )
    if class_weight is not None:
        lines.append(
            "class weights (balanced): "
            + ", ".join(
                f"{data.class_names[index]}={weight:.3f}" for index, weight in class_weight.items()
            )
        )
    return lines


def fit_plan_line(config: TrainConfig, train_images: int) -> str:
    """How fitting will go: iterations per epoch = ceil(N / batch), epochs, optimizer, loss."""
    steps = iterations_per_epoch(train_images, config.batch_size)
    line = (
        f"iterations per epoch: ceil({train_images} / {config.batch_size}) = {steps}; "
        f"up to {config.epochs} epochs, {config.optimizer} at learning rate "
        f"{config.learning_rate} ({config.lr_schedule}), loss {config.loss}"
    )
    if config.optimizer == "adamw":
        line += f", weight decay {config.weight_decay}"
    if config.label_smoothing:
        line += f", label smoothing {config.label_smoothing}"
    if config.uses_backbone:
        line += f"; backbone {config.backbone}, weights {config.weights}"
    return line


def training_figures(config: TrainConfig, fitted: Fitted, train_images: int, class_weight) -> dict:
    """``metadata.json``'s ``training`` section: epochs, iterations, seconds, throughput."""
    figures = {
        "epochs_run": len(fitted.history["loss"]),
        "iterations_per_epoch": iterations_per_epoch(train_images, config.batch_size),
        "fit_seconds": round(fitted.seconds, 2),
        "train_images_per_second": images_per_second(fitted, train_images),
        "class_weight": class_weight,
    }
    if fitted.phases is not None:
        figures["phases"] = fitted.phases
    return figures


def contract_metrics(report: dict, history: dict) -> dict:
    """The figures the model's contract carries: test accuracy and how training ended."""
    return {
        "test_accuracy": report["test_accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "best_val_loss": min(history["val_loss"]) if "val_loss" in history else None,
        "final_train_accuracy": history["accuracy"][-1],
    }


def library_versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def build_metadata(
    config: TrainConfig, contract: ModelContract, data: PreparedData, training: dict
) -> dict:
    """``metadata.json``: the model's contract, then how this run made it."""
    metadata = contract.to_metadata()
    metadata["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    splits = data.splits
    metadata["data"] |= {
        "num_images": len(data.images),
        "skipped_files": len(data.images.skipped),
        "class_counts": dict(
            zip(
                data.class_names,
                np.bincount(data.labels, minlength=data.num_classes).tolist(),
                strict=True,
            )
        ),
        "splits": {
            "train": len(splits.train),
            "validation": len(splits.validation),
            "test": len(splits.test),
        },
    }
    metadata["config"] = config.to_dict()
    metadata["training"] = training
    metadata["versions"] = library_versions()
    metadata["git_commit"] = artifacts.git_commit()
    return metadata
