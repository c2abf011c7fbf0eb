"""The jobs: a training run (data, labels, splits, fit, evaluate, artifacts, export, publish),
and the re-export of an existing artifact. Stages hand each other objects in memory; the
artifact folder is the output."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np

from service.contract import ModelContract
from service.postprocessing import softmax
from training import artifacts, plots
from training.audit.job import audit_training_data
from training.audit.report import write_report
from training.backbones import (
    build_head,
    copy_head,
    resolve_weights,
    unfreeze_top,
)
from training.calibration import calibration_report
from training.checkpoints import (
    backup_dir,
    prepare_backup,
    read_history,
    resumable_callbacks,
    signals_recorded,
)
from training.config import ExportConfig, TrainConfig
from training.data import (
    PreparedData,
    balanced_class_weights,
    iterations_per_epoch,
    load_model_inputs,
    make_dataset,
    prepare_data,
)
from training.distribute import fit_distributed, is_chief, make_strategy
from training.evaluate import (
    embed_arrays,
    embedding_model,
    evaluation_report,
    format_report,
    predict_embeddings,
)
from training.export import OPSET, ExportError, export_model
from training.model import build_compiled_model, compile_model
from training.ood import (
    DETECTOR_FILE,
    OOD_OUTPUT_NAME,
    MahalanobisDetector,
    detection_report,
    fit_mahalanobis,
    format_detection,
    outlier_sets,
    threshold_for,
)
from training.publish import publish_artifact

log = logging.getLogger(__name__)


def format_label_table(class_names: list[str], labels: np.ndarray) -> str:
    """The class-label file as the course shows it: integer label, class name, image count."""
    counts = np.bincount(labels, minlength=len(class_names))
    lines = [f"{'label':>5}  {'class':<16} {'images':>7}"]
    lines += [
        f"{index:>5}  {name:<16} {counts[index]:>7d}" for index, name in enumerate(class_names)
    ]
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def build_callbacks(config: TrainConfig, has_validation: bool, min_lr: float = 1e-5) -> list:
    monitor = "val_loss" if has_validation else "loss"
    # Halve the learning rate when the loss stalls: smaller steps settle into the minimum.
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=0.5, patience=2, min_lr=min_lr, verbose=1
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


def build_metadata(
    config: TrainConfig,
    contract: ModelContract,
    data: PreparedData,
    training: dict,
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


def fit(
    config,
    model,
    strategy,
    train_dataset,
    validation_dataset,
    class_weight,
    epochs: int | None = None,
    min_lr: float = 1e-5,
) -> dict:
    """Fit ``model`` for ``epochs`` (default ``config.epochs``); return its whole history
    (epochs before an interruption included)."""
    callbacks = build_callbacks(config, validation_dataset is not None, min_lr)
    if config.distribute == "multi-worker":
        return fit_distributed(
            model, strategy, train_dataset, validation_dataset, config, callbacks, class_weight
        )
    backup = prepare_backup(config)
    with signals_recorded(signal.SIGTERM) as received:
        model.fit(
            train_dataset,
            validation_data=validation_dataset,
            epochs=epochs or config.epochs,
            class_weight=class_weight,
            callbacks=callbacks + resumable_callbacks(backup, received),
            verbose=1 if sys.stdout.isatty() else 2,
            shuffle=False,  # the training dataset reshuffles itself every epoch
        )
    return read_history(backup)


def fit_images(config, model, strategy, dataset, splits, class_weight, **options) -> dict:
    """:func:`fit` on the images of the training split (shuffled, augmented) with the validation
    split, if any, watched: ``dataset(indices, training)`` builds each pipeline."""
    validation = dataset(splits.validation) if len(splits.validation) else None
    return fit(
        config,
        model,
        strategy,
        dataset(splits.train, training=True),
        validation,
        class_weight,
        **options,
    )


def fit_two_phases(config: TrainConfig, model, strategy, data, dataset, class_weight) -> tuple:
    """Train a backbone classifier as Keras's transfer-learning guide does.

    Phase 1: the backbone is frozen, so its features of each image never change: they are
    computed once (one pass over the training and validation images) and the new head is fitted
    on them for ``--epochs``, seconds instead of epochs of backbone passes. Phase 2: the top
    ``--fine-tune-layers`` layers of the backbone are unfrozen (BatchNormalization stays frozen)
    and the whole model is fitted on the images, augmented, at ``--fine-tune-learning-rate``.

    Returns:
        ``(history of both phases, with a "phase" entry per epoch, per-phase figures)``.
    """
    splits = data.splits
    has_validation = len(splits.validation) > 0
    # The embedding (the logits layer's input) is the backbone's pooled features: dropout passes
    # them unchanged outside training.
    embedder = embedding_model(model)
    started = time.monotonic()
    _, train_features, _ = predict_embeddings(embedder, dataset(splits.train))
    validation = None
    if has_validation:
        _, validation_features, _ = predict_embeddings(embedder, dataset(splits.validation))
        validation = (validation_features, data.targets[splits.validation])
    feature_seconds = time.monotonic() - started
    featured = len(splits.train) + len(splits.validation)
    head = compile_model(
        build_head(train_features.shape[1], data.num_classes),
        config.loss,
        config.optimizer,
        config.learning_rate,
        config.momentum,
    )
    started = time.monotonic()
    head_fit = head.fit(
        train_features,
        data.targets[splits.train],
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=validation,
        class_weight=class_weight,
        callbacks=build_callbacks(config, has_validation),
        verbose=1 if sys.stdout.isatty() else 2,
    )
    head_seconds = time.monotonic() - started
    copy_head(head, model)
    history = {key: [float(value) for value in values] for key, values in head_fit.history.items()}
    head_epochs = len(history["loss"])
    phases = {
        "head": {
            "epochs": head_epochs,
            "first_epoch": 1,
            "learning_rate": config.learning_rate,
            "feature_images": featured,
            "feature_seconds": round(feature_seconds, 2),
            "feature_images_per_second": round(featured / feature_seconds, 1),
            "fit_seconds": round(head_seconds, 2),
            # The same epochs with a backbone pass over every image in each.
            "uncached_seconds_estimate": round(head_epochs * feature_seconds, 1),
        }
    }
    print(
        f"phase 1 (head, backbone frozen): features of {featured} images computed once in "
        f"{feature_seconds:.1f} s, then {head_epochs} epochs on them in {head_seconds:.1f} s "
        f"(about {phases['head']['uncached_seconds_estimate']:.0f} s with a backbone pass per "
        "epoch)"
    )
    history["phase"] = ["head"] * head_epochs
    if config.phase_2_epochs == 0:
        return history, phases
    trainable = unfreeze_top(model, config.fine_tune_layers)
    compile_model(
        model, config.loss, config.optimizer, config.fine_tune_learning_rate, config.momentum
    )
    print(
        f"phase 2 (fine-tuning): the top {config.fine_tune_layers} layers of {config.backbone} "
        f"unfrozen, BatchNormalization frozen ({trainable} trainable weight tensors), up to "
        f"{config.phase_2_epochs} epochs at learning rate {config.fine_tune_learning_rate}"
    )
    started = time.monotonic()
    fine = fit_images(
        config,
        model,
        strategy,
        dataset,
        splits,
        class_weight,
        epochs=config.phase_2_epochs,
        min_lr=config.fine_tune_learning_rate / 10,
    )
    fine_seconds = time.monotonic() - started
    fine_epochs = len(fine["loss"])
    for key in history:
        if key != "phase":
            history[key] += [float(value) for value in fine.get(key, [float("nan")] * fine_epochs)]
    history["phase"] += ["fine_tune"] * fine_epochs
    phases["fine_tune"] = {
        "epochs": fine_epochs,
        "first_epoch": head_epochs + 1,
        "learning_rate": config.fine_tune_learning_rate,
        "layers": config.fine_tune_layers,
        "trainable_weight_tensors": trainable,
        "fit_seconds": round(fine_seconds, 2),
        "train_images_per_second": round(len(splits.train) * fine_epochs / fine_seconds, 1),
    }
    return history, phases


def phase_summary(history: dict, phases: dict) -> dict:
    """The report's view of each phase: its epochs and where its validation metrics ended."""
    summary = {}
    for name, figures in phases.items():
        row = {"epochs": figures["epochs"], "first_epoch": figures["first_epoch"]}
        last = figures["first_epoch"] + figures["epochs"] - 2  # index of its last epoch
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if key in history:
                row[f"final_{key}"] = history[key][last]
        summary[name] = row
    return summary


def calibrate_and_fit_detector(config: TrainConfig, data, embedder, dataset, test) -> tuple:
    """Fit the temperature and the unknown-input detector, and measure both on the test split
    and on inputs that no class covers.

    Args:
        embedder: the trained model returning ``(logits, embedding)``.
        dataset: ``indices -> batched (pixels, one_hot)`` dataset, unaugmented and in order.
        test: ``(logits, embeddings, labels)`` of the test split.

    Returns:
        ``(detector with its threshold, calibration report, detection report)``.
    """
    splits = data.splits
    test_logits, test_features, test_labels = test
    _, train_features, train_labels = predict_embeddings(embedder, dataset(splits.train))
    if len(splits.validation):
        held_out = predict_embeddings(embedder, dataset(splits.validation))
    else:
        log.warning("no validation split: temperature 1 and the threshold set on training images")
        held_out = (np.zeros((0, data.num_classes)), train_features, np.zeros(0, dtype=int))
    validation_logits, validation_features, validation_labels = held_out
    calibration = calibration_report(validation_logits, validation_labels, test_logits, test_labels)
    temperature = calibration["temperature"]
    detector = fit_mahalanobis(train_features, train_labels, data.num_classes)
    detector.threshold = threshold_for(detector.scores(validation_features), config.ood_acceptance)
    test_inputs = load_model_inputs(data.images, splits.test, data.spec)
    outliers = {}
    for name, inputs in outlier_sets(data.spec, test_inputs, config.seed).items():
        logits, features = embed_arrays(embedder, inputs)
        outliers[name] = (detector.scores(features), softmax(logits / temperature).max(axis=-1))
    detection = detection_report(
        detector,
        config.ood_acceptance,
        detector.scores(test_features),
        softmax(test_logits / temperature).max(axis=-1),
        outliers,
    )
    print(format_detection(detection, calibration))
    return detector, calibration, detection


def run_training(config: TrainConfig) -> Path | None:
    """Train, evaluate and write one complete artifact version, export and publish it; return its
    folder (None on a worker that is not the chief of a multi-worker run: only the chief writes
    artifacts)."""
    started = time.monotonic()
    weights = None
    if config.uses_backbone:
        # First of all: a download that cannot work fails here, in seconds, not after the data.
        weights = resolve_weights(config.backbone, config.weights)
        if weights is None:
            print(
                f"note: --weights none: {config.backbone} starts from random weights, whose "
                "features teach the head nothing; for tests and smoke runs"
            )
    strategy, tf_config = make_strategy(config.distribute)  # before any other TensorFlow op
    chief = is_chief(tf_config)
    keras.utils.set_random_seed(config.seed)
    data = prepare_data(config)
    data, audit = audit_training_data(config, data)  # the data audit: report, stop or act
    splits, num_classes = data.splits, data.num_classes
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
        model = build_compiled_model(config, data.spec, num_classes, weights)
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
        + (
            f"; backbone {config.backbone}, weights {config.weights}"
            if config.uses_backbone
            else ""
        )
    )
    fit_started = time.monotonic()
    phases = None
    if config.uses_backbone:
        history, phases = fit_two_phases(config, model, strategy, data, dataset, class_weight)
    else:
        history = fit_images(config, model, strategy, dataset, splits, class_weight)
        history = {key: [float(value) for value in values] for key, values in history.items()}
    fit_seconds = time.monotonic() - fit_started
    if not chief:
        print("training finished on this worker; the chief evaluates and writes the artifacts")
        return None
    if config.distribute != "none":
        # Evaluate, save and export a plain copy: distributed variables do not convert to ONNX.
        trained = build_compiled_model(config, data.spec, num_classes)
        trained.set_weights(model.get_weights())
        model = trained

    embedder = embedding_model(model)
    test_logits, test_features, test_labels = predict_embeddings(embedder, dataset(splits.test))
    report = evaluation_report(test_labels, test_logits, data.class_names)
    if phases is not None:
        report["training_phases"] = phase_summary(history, phases)
    print(format_report(report))
    detector, report["calibration"], report["unknown_inputs"] = calibrate_and_fit_detector(
        config, data, embedder, dataset, (test_logits, test_features, test_labels)
    )

    epochs_run = len(history["loss"])
    training = {
        "epochs_run": epochs_run,
        "iterations_per_epoch": steps,
        "fit_seconds": round(fit_seconds, 2),
        # Images through the whole network: phase 2's for a backbone (phase 1 fits on features).
        "train_images_per_second": (
            phases.get("fine_tune", {}).get("train_images_per_second")
            if phases
            else round(len(splits.train) * epochs_run / fit_seconds, 1)
        ),
        "class_weight": class_weight,
    }
    if phases is not None:
        training["phases"] = phases
    with artifacts.staged_version(config.output, config.name) as (folder, version):
        contract = ModelContract(
            name=config.name,
            version=version,
            labels=tuple(data.class_names),
            image=data.spec,
            opset=OPSET,
            metrics={
                "test_accuracy": report["test_accuracy"],
                "balanced_accuracy": report["balanced_accuracy"],
                "best_val_loss": min(history["val_loss"]) if has_validation else None,
                "final_train_accuracy": history["accuracy"][-1],
            },
            data_source=data.images.source,
            data_fingerprint=data.images.fingerprint,
            precision="int8" if config.quantize == "int8" else "float32",
            temperature=report["calibration"]["temperature"],
            ood_output_name=OOD_OUTPUT_NAME,
            ood_threshold=detector.threshold,
        )
        model.save(folder / "model.keras")
        artifacts.write_json(folder / "labels.json", contract.to_labels_file())
        artifacts.write_json(folder / "history.json", history)
        artifacts.write_json(folder / "report.json", report)
        plots.plot_training(history, folder / "plots")
        plots.plot_confusion_matrix(
            report["confusion_matrix"], data.class_names, folder / "plots" / "confusion_matrix.png"
        )
        plots.plot_reliability(report["calibration"], folder / "plots" / "reliability.png")
        detector.save(folder / DETECTOR_FILE)
        if audit is not None:
            write_report(audit, data.images, folder / "audit")
        metadata = build_metadata(config, contract, data, training)
        if config.export:
            metadata["export"] = export_model(folder, model, data, contract, config.seed, detector)
        artifacts.write_json(folder / "metadata.json", metadata)
    if config.distribute != "multi-worker":
        shutil.rmtree(backup_dir(config), ignore_errors=True)  # nothing to resume
    final = Path(config.output) / config.name / version
    print(f"artifacts: {final} ({time.monotonic() - started:.0f} s in all)")
    if config.export and config.publish:
        tag = publish_artifact(final, contract, metadata["export"], metadata["git_commit"])
        print(f"published to the BentoML model store as {tag}")
    return final


def run_export(config: ExportConfig) -> str | None:
    """``python -m training export``: export an existing artifact again and publish it.

    Returns:
        The model-store tag, or None when ``--no-publish``.
    """
    folder = artifacts.resolve_artifact(config.artifact)
    metadata = artifacts.read_json(folder / "metadata.json")
    contract = dataclasses.replace(ModelContract.from_metadata(metadata), opset=OPSET)
    if config.quantize is not None:
        precision = "int8" if config.quantize == "int8" else "float32"
        contract = dataclasses.replace(contract, precision=precision)
    trained = TrainConfig.from_dict(metadata["config"])
    data = prepare_data(trained)
    if data.images.fingerprint != contract.data_fingerprint:
        raise ExportError(
            f"the data {contract.data_source} changed since {folder} was trained "
            "(fingerprint differs), so its held-out images cannot be rebuilt: train again"
        )
    model = keras.saving.load_model(folder / "model.keras")
    metadata |= contract.to_metadata() | {"data": metadata["data"]}
    detector = None
    if contract.has_detector:
        if not (folder / DETECTOR_FILE).is_file():
            raise ExportError(
                f"{folder / DETECTOR_FILE} is missing: its model was trained with an unknown-input "
                "detector; train again to re-create it"
            )
        detector = MahalanobisDetector.load(folder / DETECTOR_FILE)
    metadata["export"] = export_model(folder, model, data, contract, trained.seed, detector)
    artifacts.write_json(folder / "metadata.json", metadata)
    print(f"exported {folder / 'model.onnx'}")
    if not config.publish:
        return None
    tag = publish_artifact(folder, contract, metadata["export"], metadata.get("git_commit"))
    print(f"published to the BentoML model store as {tag}")
    return tag
