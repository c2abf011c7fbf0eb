"""The training run: data, labels, splits, fit, evaluate, artifacts, then export and publish."""

from __future__ import annotations

import logging
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.preprocessing import ImageSpec
from training import artifacts, plots
from training.config import TrainConfig
from training.data import (
    Splits,
    balanced_class_weights,
    class_names_of,
    encode_labels,
    iterations_per_epoch,
    make_dataset,
    one_hot,
    select_classes,
    split_indices,
)
from training.evaluate import evaluation_report, format_report, predict_logits
from training.sources import LabelledImages, load_source

log = logging.getLogger(__name__)

# Input side used for sources whose images differ in size (folders of photos).
DEFAULT_FOLDER_IMAGE_SIZE = 64


@dataclass
class PreparedData:
    """A source after class selection, with its label encoding and splits: everything a run
    (or a later re-export) needs to reproduce the same held-out images."""

    images: LabelledImages
    class_names: list[str]
    spec: ImageSpec
    labels: np.ndarray  # (N,) int64, integer encoding
    targets: np.ndarray  # (N, K) float32, one-hot encoding
    splits: Splits


def prepare_data(config: TrainConfig) -> PreparedData:
    images = select_classes(
        load_source(config.data), config.classes, config.other, config.max_per_class, config.seed
    )
    class_names = class_names_of(images)
    size = config.image_size or images.native_size or DEFAULT_FOLDER_IMAGE_SIZE
    spec = ImageSpec(
        height=size,
        width=size,
        channels=config.channels or images.channels,
        resize_method=config.resize_method,
    )
    labels = encode_labels(images.names, class_names)
    splits = split_indices(labels, config.validation_split, config.test_split, config.seed)
    return PreparedData(
        images, class_names, spec, labels, one_hot(labels, len(class_names)), splits
    )


def format_label_table(class_names: list[str], labels: np.ndarray) -> str:
    """The class-label file as the course shows it: integer label, class name, image count."""
    counts = np.bincount(labels, minlength=len(class_names))
    lines = [f"{'label':>5}  {'class':<16} {'images':>7}"]
    lines += [
        f"{index:>5}  {name:<16} {counts[index]:>7d}" for index, name in enumerate(class_names)
    ]
    return "\n".join(lines)


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


def build_callbacks(config: TrainConfig, has_validation: bool) -> list:
    import keras

    monitor = "val_loss" if has_validation else "loss"
    # Halve the learning rate when the loss stalls: smaller steps settle into the minimum.
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=0.5, patience=2, min_lr=1e-5, verbose=1
        )
    ]
    if config.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor,
                patience=config.early_stopping_patience,
                restore_best_weights=True,
                verbose=1,
            )
        )
    return callbacks


def build_compiled_model(config: TrainConfig, spec: ImageSpec, num_classes: int):
    from training.model import build_model, compile_model

    return compile_model(
        build_model(spec, num_classes),
        config.loss,
        config.optimizer,
        config.learning_rate,
        config.momentum,
    )


def run_training(config: TrainConfig) -> Path | None:
    """Train, evaluate and write one complete artifact version; return its folder (None on a
    worker that is not the chief of a multi-worker run: only the chief writes artifacts)."""
    import keras

    from training.distribute import is_chief, make_strategy

    started = time.monotonic()
    strategy, tf_config = make_strategy(config.distribute)  # before any other TensorFlow op
    chief = is_chief(tf_config)
    keras.utils.set_random_seed(config.seed)
    data = prepare_data(config)
    splits, num_classes = data.splits, len(data.class_names)
    print(f"data: {data.images.source}, {len(data.images)} images, {num_classes} classes")
    if data.images.skipped:
        print(f"skipped {len(data.images.skipped)} unreadable file(s); see the warnings above")
    print(format_label_table(data.class_names, data.labels))
    print(
        f"splits: {len(splits.train)} train, {len(splits.validation)} validation, "
        f"{len(splits.test)} test (stratified, seed {config.seed}); model input {data.spec.shape}"
    )

    class_weight = None
    if config.other is not None:
        class_weight = balanced_class_weights(data.labels[splits.train], num_classes)
        print(
            "class weights (balanced): "
            + ", ".join(
                f"{data.class_names[index]}={weight:.3f}" for index, weight in class_weight.items()
            )
        )

    def dataset(indices, training=False):
        return make_dataset(
            data.images,
            indices,
            data.targets,
            data.spec,
            config.batch_size,
            training=training,
            seed=config.seed,
            augment=config.augment and training,
        )

    has_validation = len(splits.validation) > 0
    with strategy.scope():
        model = build_compiled_model(config, data.spec, num_classes)
    if config.distribute != "none":
        print(
            f"distributed: {strategy.num_replicas_in_sync} replicas in sync; --batch-size "
            f"{config.batch_size} is the global batch, split across them"
        )
    steps = iterations_per_epoch(len(splits.train), config.batch_size)
    print(
        f"iterations per epoch: ceil({len(splits.train)} / {config.batch_size}) = {steps}; "
        f"up to {config.epochs} epochs, {config.optimizer} at learning rate "
        f"{config.learning_rate}, "
        f"loss {config.loss}"
    )
    fit_started = time.monotonic()
    train_dataset = dataset(splits.train, training=True)
    validation_dataset = dataset(splits.validation) if has_validation else None
    callbacks = build_callbacks(config, has_validation)
    if config.distribute == "multi-worker":
        from training.distribute import fit_distributed

        history = fit_distributed(
            model, strategy, train_dataset, validation_dataset, config, callbacks, class_weight
        )
    else:
        from training.checkpoints import (
            prepare_backup,
            read_history,
            resumable_callbacks,
            signals_recorded,
        )

        backup = prepare_backup(config)
        with signals_recorded(signal.SIGTERM) as received:
            model.fit(
                train_dataset,
                validation_data=validation_dataset,
                epochs=config.epochs,
                class_weight=class_weight,
                callbacks=callbacks + resumable_callbacks(backup, received),
                verbose=1 if sys.stdout.isatty() else 2,
                shuffle=False,  # the training dataset reshuffles itself every epoch
            )
        history = read_history(backup)  # epochs before an interruption included
    fit_seconds = time.monotonic() - fit_started
    history = {key: [float(value) for value in values] for key, values in history.items()}
    if not chief:
        print("training finished on this worker; the chief evaluates and writes the artifacts")
        return None
    if config.distribute != "none":
        # Evaluate, save and export a plain copy: distributed variables do not convert to ONNX.
        trained = build_compiled_model(config, data.spec, num_classes)
        trained.set_weights(model.get_weights())
        model = trained

    logits, true_labels = predict_logits(model, dataset(splits.test))
    report = evaluation_report(true_labels, logits, data.class_names)
    print(format_report(report))

    with artifacts.staged_version(config.output, config.name) as (folder, version):
        model.save(folder / "model.keras")
        artifacts.write_json(folder / "labels.json", {"labels": data.class_names})
        artifacts.write_json(folder / "history.json", history)
        artifacts.write_json(folder / "report.json", report)
        plots.plot_training(history, folder / "plots")
        plots.plot_confusion_matrix(
            report["confusion_matrix"], data.class_names, folder / "plots" / "confusion_matrix.png"
        )
        epochs_run = len(history["loss"])
        metadata = {
            "name": config.name,
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "labels": data.class_names,
            "image": data.spec.to_dict(),
            "input": {
                "name": "image",
                "shape": [None, *data.spec.shape],
                "dtype": "float32",
                "range": "raw 0-255 pixels",
            },
            "normalization": "in-graph: Rescaling(1/255) is the model's first layer",
            "output": {
                "name": "logits",
                "shape": [None, num_classes],
                "dtype": "float32",
                "postprocess": "softmax, then argmax / top-k",
            },
            "data": {
                "source": data.images.source,
                "fingerprint": data.images.fingerprint,
                "num_images": len(data.images),
                "skipped_files": len(data.images.skipped),
                "class_counts": dict(
                    zip(
                        data.class_names,
                        np.bincount(data.labels, minlength=num_classes).tolist(),
                        strict=True,
                    )
                ),
                "splits": {
                    "train": len(splits.train),
                    "validation": len(splits.validation),
                    "test": len(splits.test),
                },
            },
            "config": config.to_dict(),
            "training": {
                "epochs_run": epochs_run,
                "iterations_per_epoch": steps,
                "fit_seconds": round(fit_seconds, 2),
                "train_images_per_second": round(len(splits.train) * epochs_run / fit_seconds, 1),
                "class_weight": class_weight,
            },
            "metrics": {
                "test_accuracy": report["test_accuracy"],
                "balanced_accuracy": report["balanced_accuracy"],
                "best_val_loss": min(history["val_loss"]) if has_validation else None,
                "final_train_accuracy": history["accuracy"][-1],
            },
            "versions": library_versions(),
            "git_commit": artifacts.git_commit(),
        }
        artifacts.write_json(folder / "metadata.json", metadata)
        if config.export:
            from training.export import export_artifact

            export_artifact(folder, model, data)
    if config.distribute != "multi-worker":
        shutil.rmtree(backup, ignore_errors=True)  # the run is complete: nothing to resume
    final = Path(config.output) / config.name / version
    print(f"artifacts: {final} ({time.monotonic() - started:.0f} s in all)")
    if config.export and config.publish:
        from training.publish import publish_artifact

        print(f"published to the BentoML model store as {publish_artifact(final)}")
    return final
