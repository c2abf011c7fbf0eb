"""Fitting by gradient descent: Keras's callbacks, the resumable ``model.fit`` of the CNN, and a
backbone's two phases (a head on cached features, then fine-tuning)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras

from training.config import TrainConfig
from training.data.pipelines import iterations_per_epoch
from training.data.prepare import PreparedData
from training.fit.checkpoints import (
    prepare_backup,
    read_history,
    resumable_callbacks,
    signals_recorded,
)
from training.fit.distribute import fit_distributed
from training.model.backbones import build_head, copy_head, unfreeze_top
from training.model.cnn import compile_model, embedding_model, has_schedule, predict_embeddings

# ``(indices, training=False) -> batched (pixels, one_hot) dataset``: shuffled and augmented
# when ``training``, else in order.
DatasetFactory = Callable[..., object]


@dataclass
class Fitted:
    """What fitting gave: the history of every epoch (a ``phase`` entry per epoch for a
    backbone), each phase's figures (None for the CNN), and the seconds it took."""

    history: dict[str, list]
    phases: dict | None
    seconds: float


def history_floats(history: dict) -> dict[str, list[float]]:
    """A Keras history with every value a plain float (JSON- and plot-ready)."""
    return {key: [float(value) for value in values] for key, values in history.items()}


class LearningRateLog(keras.callbacks.Callback):
    """Record the learning rate a schedule reached at the end of each epoch in the history."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


def build_callbacks(
    config: TrainConfig, has_validation: bool, min_lr: float = 1e-5, scheduled: bool = False
) -> list:
    """Early stopping, and the learning rate's plateau rule, or with ``scheduled`` (the
    optimizer follows a schedule) a log of the rate the schedule reached."""
    monitor = "val_loss" if has_validation else "loss"
    if scheduled:
        callbacks = [LearningRateLog()]
    else:
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


def _verbosity() -> int:
    return 1 if sys.stdout.isatty() else 2


def fit(
    config: TrainConfig,
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
    callbacks = build_callbacks(
        config, validation_dataset is not None, min_lr, scheduled=has_schedule(model)
    )
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
            verbose=_verbosity(),
            shuffle=False,  # the training dataset reshuffles itself every epoch
        )
    return read_history(backup)


def fit_images(config, model, strategy, dataset: DatasetFactory, splits, class_weight, **options):
    """:func:`fit` on the images of the training split (shuffled, augmented) with the validation
    split, if any, watched."""
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


def fit_model(
    config: TrainConfig, model, strategy, data: PreparedData, dataset: DatasetFactory, class_weight
) -> Fitted:
    """Fit ``model``: the CNN in one go, a backbone in two phases."""
    started = time.monotonic()
    if config.uses_backbone:
        history, phases = fit_two_phases(config, model, strategy, data, dataset, class_weight)
    else:
        history = fit_images(config, model, strategy, dataset, data.splits, class_weight)
        history, phases = history_floats(history), None
    return Fitted(history, phases, time.monotonic() - started)


def fit_two_phases(config: TrainConfig, model, strategy, data, dataset, class_weight) -> tuple:
    """Train a backbone classifier as Keras's transfer-learning guide does: phase 1 fits a new
    head on the frozen backbone's features (:func:`fit_head`), phase 2 fine-tunes the top of the
    backbone (:func:`fine_tune`).

    Returns:
        ``(history of both phases, with a "phase" entry per epoch, per-phase figures)``.
    """
    history, head = fit_head(config, model, data, dataset, class_weight)
    phases = {"head": head}
    if config.phase_2_epochs == 0:
        return history, phases
    fine, phases["fine_tune"] = fine_tune(
        config, model, strategy, data, dataset, class_weight, first_epoch=head["epochs"] + 1
    )
    epochs = phases["fine_tune"]["epochs"]
    for key in history:
        if key != "phase":
            history[key] += fine.get(key, [float("nan")] * epochs)
    history["phase"] += ["fine_tune"] * epochs
    return history, phases


def fit_head(config: TrainConfig, model, data, dataset, class_weight) -> tuple[dict, dict]:
    """Phase 1: the backbone is frozen, so its features of each image never change: they are
    computed once (one pass over the training and validation images) and a new head is fitted on
    them for ``--epochs``, seconds instead of epochs of backbone passes. The head's weights are
    then copied into ``model``.

    Returns:
        ``(history with a "phase" entry per epoch, the phase's figures)``.
    """
    splits = data.splits
    # The embedding (the logits layer's input) is the backbone's pooled features: dropout passes
    # them unchanged outside training.
    embedder = embedding_model(model)
    started = time.monotonic()
    _, train_features, _ = predict_embeddings(embedder, dataset(splits.train))
    validation = None
    if len(splits.validation):
        _, validation_features, _ = predict_embeddings(embedder, dataset(splits.validation))
        validation = (validation_features, data.targets[splits.validation])
    feature_seconds = time.monotonic() - started
    steps = iterations_per_epoch(len(splits.train), config.batch_size)
    head = compile_model(
        build_head(train_features.shape[1], data.num_classes), config, steps_per_epoch=steps
    )
    started = time.monotonic()
    fitted = head.fit(
        train_features,
        data.targets[splits.train],
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=validation,
        class_weight=class_weight,
        callbacks=build_callbacks(config, validation is not None, scheduled=has_schedule(head)),
        verbose=_verbosity(),
    )
    head_seconds = time.monotonic() - started
    copy_head(head, model)
    history = history_floats(fitted.history)
    epochs = len(history["loss"])
    history["phase"] = ["head"] * epochs
    featured = len(splits.train) + len(splits.validation)
    figures = {
        "epochs": epochs,
        "first_epoch": 1,
        "learning_rate": config.learning_rate,
        "feature_images": featured,
        "feature_seconds": round(feature_seconds, 2),
        "feature_images_per_second": round(featured / feature_seconds, 1),
        "fit_seconds": round(head_seconds, 2),
        # The same epochs with a backbone pass over every image in each.
        "uncached_seconds_estimate": round(epochs * feature_seconds, 1),
    }
    print(
        f"phase 1 (head, backbone frozen): features of {featured} images computed once in "
        f"{feature_seconds:.1f} s, then {epochs} epochs on them in {head_seconds:.1f} s "
        f"(about {figures['uncached_seconds_estimate']:.0f} s with a backbone pass per epoch)"
    )
    return history, figures


def fine_tune(
    config: TrainConfig, model, strategy, data, dataset, class_weight, first_epoch: int
) -> tuple[dict, dict]:
    """Phase 2: the top ``--fine-tune-layers`` layers of the backbone are unfrozen
    (BatchNormalization stays frozen) and the whole model is fitted on the images, augmented, at
    ``--fine-tune-learning-rate``.

    Returns:
        ``(history, the phase's figures)``.
    """
    trainable = unfreeze_top(model, config.fine_tune_layers)
    compile_model(
        model,
        config,
        config.fine_tune_learning_rate,
        steps_per_epoch=iterations_per_epoch(len(data.splits.train), config.batch_size),
        epochs=config.phase_2_epochs,
    )
    print(
        f"phase 2 (fine-tuning): the top {config.fine_tune_layers} layers of {config.backbone} "
        f"unfrozen, BatchNormalization frozen ({trainable} trainable weight tensors), up to "
        f"{config.phase_2_epochs} epochs at learning rate {config.fine_tune_learning_rate}"
    )
    started = time.monotonic()
    history = fit_images(
        config,
        model,
        strategy,
        dataset,
        data.splits,
        class_weight,
        epochs=config.phase_2_epochs,
        min_lr=config.fine_tune_learning_rate / 10,
    )
    seconds = time.monotonic() - started
    epochs = len(history["loss"])
    figures = {
        "epochs": epochs,
        "first_epoch": first_epoch,
        "learning_rate": config.fine_tune_learning_rate,
        "layers": config.fine_tune_layers,
        "trainable_weight_tensors": trainable,
        "fit_seconds": round(seconds, 2),
        "train_images_per_second": round(len(data.splits.train) * epochs / seconds, 1),
    }
    return history_floats(history), figures


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


def images_per_second(fitted: Fitted, train_images: int) -> float | None:
    """Training images through the whole network per second: phase 2's for a backbone (phase 1
    fits on cached features), else the whole fit's."""
    if fitted.phases:
        return fitted.phases.get("fine_tune", {}).get("train_images_per_second")
    return round(train_images * len(fitted.history["loss"]) / fitted.seconds, 1)
