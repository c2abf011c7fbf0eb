"""The tf.data input pipelines that feed ``model.fit``: images preprocessed by the one shared
definition, cached in memory when they fit, augmented when asked; and the iterations per
epoch, ceil(N / batch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from service.core.preprocessing import (
    PIXEL_LIMIT_BYTES,
    ImageSpec,
    preprocess_array,
    preprocess_bytes,
)
from training.config import TrainConfig
from training.data.sources import LabelledImages

log = logging.getLogger(__name__)


# Keep decoded folder images in memory when they fit in this many bytes; larger sets stream.
IN_MEMORY_CACHE_BYTES = 2 * 1024**3


def iterations_per_epoch(num_images: int, batch_size: int) -> int:
    """Gradient-descent steps per epoch: ceil(N / batch); the last batch may be smaller."""
    return -(-num_images // batch_size)


def preprocess_in_memory(images: LabelledImages, spec: ImageSpec) -> np.ndarray:
    """Model inputs of an in-memory source: ``(N, H, W, C)`` uint8."""
    if images.pixels.shape[1:] == spec.shape:
        return images.pixels
    if images.pixels.ndim == 3 and images.pixels.shape[1:] == spec.shape[:2] and spec.channels == 1:
        return images.pixels[..., np.newaxis]
    return np.stack([preprocess_array(pixels, spec) for pixels in images.pixels])


def load_model_inputs(images: LabelledImages, indices: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Model inputs of the images at ``indices``, eagerly: ``(len(indices), H, W, C)`` uint8."""
    subset = images.subset(indices)
    if subset.pixels is not None:
        return preprocess_in_memory(subset, spec)
    inputs = np.empty((len(indices), *spec.shape), dtype=np.uint8)
    for position, path in enumerate(subset.paths):
        with open(path, "rb") as handle:
            inputs[position] = preprocess_bytes(handle.read(), spec, max_bytes=PIXEL_LIMIT_BYTES)
    return inputs


def make_dataset(
    images: LabelledImages,
    indices: np.ndarray,
    targets: np.ndarray,
    spec: ImageSpec,
    batch_size: int,
    training: bool,
    seed: int,
    augment: bool = False,
    augmentation: Augmentation | None = None,
):
    """A batched ``tf.data.Dataset`` of ``(float32 (B,H,W,C) raw 0-255 pixels, (B,K) one-hot)``.

    Training sets are shuffled every epoch and (if ``augment``) randomly changed as
    ``augmentation`` says (default: :class:`Augmentation`'s small shifts and zooms);
    evaluation sets keep their order. Folder images are decoded by the shared preprocessing
    function on the fly, in parallel, and cached in memory when they fit.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    shuffle_file_names = False
    if images.pixels is not None:
        pixels = preprocess_in_memory(images.subset(indices), spec)
        dataset = tf.data.Dataset.from_tensor_slices((pixels, targets[indices]))
    else:

        def load(path: bytes) -> np.ndarray:
            with open(path, "rb") as handle:
                return preprocess_bytes(handle.read(), spec, max_bytes=PIXEL_LIMIT_BYTES)

        def load_tensor(path, target):
            pixels = tf.numpy_function(load, [path], tf.uint8, stateful=False)
            pixels.set_shape(spec.shape)
            return pixels, target

        fits_in_memory = len(indices) * int(np.prod(spec.shape)) <= IN_MEMORY_CACHE_BYTES
        # Too large to cache: shuffle the file names, not decoded images, so the buffer stays small.
        shuffle_file_names = training and not fits_in_memory
        dataset = tf.data.Dataset.from_tensor_slices((images.paths[indices], targets[indices]))
        if shuffle_file_names:
            dataset = dataset.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(load_tensor, num_parallel_calls=autotune, deterministic=True)
        if fits_in_memory:
            dataset = dataset.cache()
    if training and not shuffle_file_names:
        dataset = dataset.shuffle(
            min(len(indices), 20_000), seed=seed, reshuffle_each_iteration=True
        )
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(
        lambda pixels, target: (tf.cast(pixels, tf.float32), target), num_parallel_calls=autotune
    )
    if training and augment:
        augmenter = build_augmenter(seed, augmentation or Augmentation())
        dataset = dataset.map(
            lambda pixels, target: (augmenter(pixels, training=True), target),
            num_parallel_calls=autotune,
        )
    return dataset.prefetch(autotune)


@dataclass(frozen=True)
class Augmentation:
    """Label-preserving random changes of training images: the largest shift and zoom (fractions
    of the side), the largest rotation (degrees) and whether to flip left-right."""

    shift: float = 0.05
    zoom: float = 0.05
    rotation: float = 0.0
    flip: bool = False


def augmentation_of(config: TrainConfig) -> Augmentation:
    return Augmentation(config.shift, config.zoom, config.rotation, config.flip)


def build_augmenter(seed: int, augmentation: Augmentation = Augmentation()):
    """The augmentation as Keras preprocessing layers, applied to training batches only (never
    exported); pixels moved in from outside the image are background (0)."""
    import keras

    layers = []
    if augmentation.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 2))
    if augmentation.rotation:
        layers.append(
            keras.layers.RandomRotation(
                augmentation.rotation / 360, fill_mode="constant", seed=seed + 3
            )
        )
    if augmentation.shift:
        layers.append(
            keras.layers.RandomTranslation(
                augmentation.shift, augmentation.shift, fill_mode="constant", seed=seed
            )
        )
    if augmentation.zoom:
        layers.append(
            keras.layers.RandomZoom(augmentation.zoom, fill_mode="constant", seed=seed + 1)
        )
    return keras.Sequential(layers or [keras.layers.Identity()], name="augmentation")
