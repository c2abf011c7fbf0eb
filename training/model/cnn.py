"""The classifier network, its loss and its optimizer, each defined once, and the embedding
model (logits and the features under them) that phase 1, the detector and the export read."""

from __future__ import annotations

import keras
import numpy as np

from service.core.contract import INPUT_NAME, OUTPUT_NAME
from service.core.preprocessing import ImageSpec
from training.config import TrainConfig
from training.model.backbones import build_backbone_model, freeze_backbone


def conv_block_count(image_size: int) -> int:
    """Downsampling blocks for a square input: halve until 4 pixels or fewer remain (2 to 5):
    3 for 28x28 (28 -> 14 -> 7 -> 3), 4 for 64x64. A third block on the built-in set's 28x28
    images lifted test accuracy from 0.986 to 0.993 (benchmarks/recipes.py, README)."""
    blocks = 0
    while image_size > 4 and blocks < 5:
        image_size //= 2
        blocks += 1
    return max(blocks, 2)


def build_model(
    spec: ImageSpec, num_classes: int, width: int = 32, blocks: int | None = None
) -> keras.Model:
    """A compact CNN: conv-BN-ReLU blocks, global average pooling, one N-way linear head.

    Input: float32 ``(B, H, W, C)`` of raw 0-255 pixels (scaled to 0-1 inside the graph, so the
    exported model carries its own normalisation). Output: ``(B, num_classes)`` logits; softmax is
    applied by the loss in training and by the service at inference.
    """
    inputs = keras.Input(shape=spec.shape, dtype="float32", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0 / 255, name="scale_pixels")(inputs)
    filters = width
    side = min(spec.height, spec.width)
    for block in range(blocks or conv_block_count(side)):
        for conv in range(2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}"
            )(x)
            # momentum 0.9 (not 0.99): the moving statistics used at inference catch up with the
            # weights within an epoch, so validation numbers are meaningful from the start.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
        if x.shape[1] >= 2 and x.shape[2] >= 2:
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
        filters = min(filters * 2, 256)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=CNN_NAME)


@keras.saving.register_keras_serializable(package="image_classifier")
def mse_on_softmax(y_true, logits):
    """Mean squared error between one-hot labels and softmax probabilities (the course's first
    loss): the model outputs logits, so softmax is applied here first."""
    return keras.losses.mean_squared_error(y_true, keras.ops.softmax(logits, axis=-1))


def per_example_loss(name: str, label_smoothing: float = 0.0):
    """The loss of each example, ``(B,)``, for hand-written training loops."""
    if name == "categorical_crossentropy":
        return lambda y_true, logits: keras.losses.categorical_crossentropy(
            y_true, logits, from_logits=True, label_smoothing=label_smoothing
        )
    if name == "mse":
        return mse_on_softmax
    raise ValueError(f"unknown loss {name!r}")


def build_loss(name: str, label_smoothing: float = 0.0):
    if name == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        )
    if name == "mse":
        return mse_on_softmax
    raise ValueError(f"unknown loss {name!r}")


def build_optimizer(
    name: str, learning_rate, momentum: float = 0.9, weight_decay: float = 0.0
) -> keras.optimizers.Optimizer:
    """``learning_rate``: a number, or a ``LearningRateSchedule`` of the optimizer's steps."""
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def learning_rate_schedule(schedule: str, peak: float, steps_per_epoch: int, epochs: int):
    """The learning rate of ``--lr-schedule`` over ``epochs`` of ``steps_per_epoch`` steps: the
    number ``peak`` for plateau (a callback then lowers it), else a Keras ``CosineDecay``:
    cosine, one epoch of warm-up from ``peak / 10`` then decay to 0; one-cycle, warm-up from
    ``peak / 25`` over 30% of the steps, then decay to 0 (Smith and Topin, 2019)."""
    total = steps_per_epoch * epochs
    if schedule == "plateau":
        return peak
    if schedule == "cosine":
        warmup, start = min(steps_per_epoch, total // 2), peak / 10
    elif schedule == "one-cycle":
        warmup, start = int(0.3 * total), peak / 25
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=start,
        decay_steps=max(total - warmup, 1),
        warmup_target=peak,
        warmup_steps=warmup,
    )


def compile_model(
    model: keras.Model,
    config: TrainConfig,
    learning_rate: float | None = None,
    steps_per_epoch: int | None = None,
    epochs: int | None = None,
) -> keras.Model:
    """Compile ``model`` with the loss and optimizer of ``config``, at ``learning_rate``
    (default ``config.learning_rate``) on ``--lr-schedule``'s curve over ``epochs`` (default
    ``--epochs``) of ``steps_per_epoch`` (without them, a constant rate for the plateau
    callback): the one compile call of every phase."""
    peak = learning_rate or config.learning_rate
    rate = peak
    if steps_per_epoch:
        rate = learning_rate_schedule(
            config.lr_schedule, peak, steps_per_epoch, epochs or config.epochs
        )
    model.compile(
        optimizer=build_optimizer(config.optimizer, rate, config.momentum, config.weight_decay),
        loss=build_loss(config.loss, config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


def has_schedule(model: keras.Model) -> bool:
    """Whether ``model``'s optimizer follows a learning-rate schedule (which the plateau
    callback must not touch)."""
    rate = getattr(model.optimizer, "_learning_rate", None)
    return isinstance(rate, keras.optimizers.schedules.LearningRateSchedule)


def build_compiled_model(
    config: TrainConfig,
    spec: ImageSpec,
    num_classes: int,
    weights: str | None = None,
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """The network of ``config``, compiled with its loss, optimizer and learning rate (on its
    schedule over ``steps_per_epoch``): the CNN, or a backbone classifier with ``weights`` (as
    :func:`training.model.backbones.resolve_weights` gives them), its backbone frozen for
    phase 1."""
    if config.uses_backbone:
        model = build_backbone_model(config.backbone, spec, num_classes, weights)
        freeze_backbone(model)
    else:
        model = build_model(spec, num_classes, config.width, config.blocks)
    return compile_model(model, config, steps_per_epoch=steps_per_epoch)


def embedding_model(model: keras.Model) -> keras.Model:
    """A Keras model that returns ``(logits, embedding)``: the embedding is the input of the
    ``logits`` layer (the penultimate layer's output; a backbone's pooled features)."""
    return keras.Model(model.input, [model.output, model.get_layer(OUTPUT_NAME).input])


CNN_NAME = "image_classifier"


def block_outputs(model: keras.Model) -> list[str]:
    """The CNN's block outputs (each block's last ReLU, before its pooling), in order; empty for
    a backbone classifier."""
    if model.name != CNN_NAME:
        return []
    return [
        layer.name
        for layer in model.layers
        if layer.name.startswith("block") and layer.name.endswith("_relu1")
    ]


def detector_model(model: keras.Model) -> keras.Model:
    """A Keras model that returns ``(logits, features)`` for the unknown-input detector: the
    spatial means of the CNN's block outputs, concatenated (the last of them is the penultimate
    layer, the global average pooling of the last block), or a backbone's pooled features."""
    names = block_outputs(model)
    if not names:
        return embedding_model(model)
    pooled = [keras.ops.mean(model.get_layer(name).output, axis=(1, 2)) for name in names]
    return keras.Model(model.input, [model.output, keras.ops.concatenate(pooled, axis=-1)])


def detector_widths(model: keras.Model) -> tuple[int, ...]:
    """The width of each layer in :func:`detector_model`'s features."""
    names = block_outputs(model)
    if not names:
        return (int(model.get_layer(OUTPUT_NAME).input.shape[-1]),)
    return tuple(int(model.get_layer(name).output.shape[-1]) for name in names)


def predict_embeddings(embedder, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits (N, K), embeddings (N, D), integer labels (N,))`` over a batched
    ``(pixels, one_hot)`` dataset, in its order."""
    logits, features, labels = [], [], []
    for pixels, targets in dataset:
        batch_logits, batch_features = embedder(pixels, training=False)
        logits.append(np.asarray(batch_logits))
        features.append(np.asarray(batch_features))
        labels.append(np.argmax(np.asarray(targets), axis=-1))
    return np.concatenate(logits), np.concatenate(features), np.concatenate(labels)


def embed_arrays(embedder, inputs: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, embeddings)`` of in-memory model inputs ``(N, H, W, C)``."""
    outputs = [
        embedder(inputs[start : start + batch].astype(np.float32), training=False)
        for start in range(0, len(inputs), batch)
    ]
    return (
        np.concatenate([np.asarray(logits) for logits, _ in outputs]),
        np.concatenate([np.asarray(features) for _, features in outputs]),
    )
