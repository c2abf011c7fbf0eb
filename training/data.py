"""Labels and splits: class selection and folding, integer then one-hot encoding, stratified
splits, class weights, the prepared data of a run, and the tf.data input pipelines that feed
``model.fit``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from service.core.preprocessing import (
    PIXEL_LIMIT_BYTES,
    ImageSpec,
    preprocess_array,
    preprocess_bytes,
)
from training.audit.duplicates import keep_one_per_group
from training.audit.scan import Scanned, scan_images
from training.config import TrainConfig
from training.sources import DataError, LabelledImages, load_sources

log = logging.getLogger(__name__)

# Keep decoded folder images in memory when they fit in this many bytes; larger sets stream.
IN_MEMORY_CACHE_BYTES = 2 * 1024**3
# Input side used for sources whose images differ in size (folders of photos).
DEFAULT_FOLDER_IMAGE_SIZE = 64
# Input side of a pretrained backbone: the side its ImageNet weights were trained at (defined
# here, where the input size is chosen; training.backbones imports it).
BACKBONE_IMAGE_SIZE = 224


def select_classes(
    images: LabelledImages,
    classes: tuple[str, ...] = (),
    other: str | None = None,
    max_per_class: int | None = None,
    seed: int = 42,
) -> LabelledImages:
    """Keep the listed classes, fold the rest into ``other`` if given, and cap images per class.

    Args:
        images: the whole source.
        classes: class names to keep; empty keeps all.
        other: if set, every image of a class not in ``classes`` is relabelled ``other``
            instead of dropped.
        max_per_class: keep at most this many images of each class of the source, chosen at
            random with ``seed``.
    """
    known = set(images.names.tolist())
    unknown = [name for name in classes if name not in known]
    if unknown:
        raise DataError(
            f"--classes names {unknown}, which {images.source} does not have; its classes are "
            + ",".join(sorted(known))
        )
    names = images.names
    indices = np.arange(len(names))
    if max_per_class is not None:
        # Capped per class of the source, before folding, so --other keeps its real share.
        rng = np.random.default_rng(seed)
        chosen = [
            rng.permutation(np.flatnonzero(names == name))[:max_per_class]
            for name in np.unique(names)
        ]
        indices = np.sort(np.concatenate(chosen))
        names = names[indices]
    if classes:
        listed = np.isin(names, classes)
        if other is None:
            indices, names = indices[listed], names[listed]
        else:
            names = np.where(listed, names, other)
    if len(np.unique(names)) < 2:
        raise DataError("fewer than two classes remain: --classes must keep at least two")
    return images.subset(indices, names=names)


def class_names_of(images: LabelledImages) -> list[str]:
    """The integer -> name mapping: the source's own order where it has a class-label file,
    else the names sorted. Folded sets (``--other``) always sort."""
    present = set(images.names.tolist())
    ordered = [name for name in images.class_order if name in present]
    return ordered if len(ordered) == len(present) else sorted(present)


def encode_labels(names: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Integer encoding: each class name becomes its index in ``class_names``. Shape ``(N,)``."""
    index = {name: position for position, name in enumerate(class_names)}
    return np.asarray([index[name] for name in names.tolist()], dtype=np.int64)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot encoding of integer labels: shape ``(N, num_classes)`` float32, one 1 per row."""
    import keras

    return keras.utils.to_categorical(labels, num_classes=num_classes).astype(np.float32)


SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    """Indices into one dataset: disjoint, stratified by class, deterministic for a seed."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_indices(
    labels: np.ndarray,
    validation_split: float,
    test_split: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> Splits:
    """Stratified train / validation / test split; both fractions are of the whole dataset.

    With ``groups`` (a group id per image), images sharing an id (copies of one picture) always
    land in the same split: the groups are split, stratified by their first image's label. Without
    any shared id the split is the same as without ``groups``.
    """
    if groups is None:
        groups = np.arange(len(labels))
    _, first, members = np.unique(groups, return_index=True, return_inverse=True)
    units = _split_units(labels[first], validation_split, test_split, seed)
    return Splits(*(np.flatnonzero(np.isin(members, part)) for part in units))


def _split_units(labels: np.ndarray, validation_split: float, test_split: float, seed: int):
    everything = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            everything, test_size=test_split, stratify=labels, random_state=seed
        )
        if validation_split == 0:
            return rest, np.array([], dtype=int), test
        train, validation = train_test_split(
            rest,
            test_size=validation_split / (1 - test_split),
            stratify=labels[rest],
            random_state=seed,
        )
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(labels)} images into stratified train/validation/test sets "
            f"({exc}); add images to the smallest class or lower --test-split/--validation-split"
        ) from exc
    return train, validation, test


def without(splits: Splits, removed: np.ndarray, test_too: bool = True) -> Splits:
    """``splits`` less the images at ``removed`` (the test split kept whole unless ``test_too``)."""

    def keep(indices: np.ndarray) -> np.ndarray:
        return indices[~np.isin(indices, removed)]

    test = keep(splits.test) if test_too else splits.test
    return Splits(keep(splits.train), keep(splits.validation), test)


def split_by_origin(
    labels: np.ndarray,
    origin: np.ndarray,
    validation_split: float,
    test_split: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> Splits:
    """:func:`split_indices` of each ``--data`` source on its own (copies of one picture, the
    ``groups``, kept within one split), joined: the first source's images split exactly as a run
    on it alone splits them, so a model trained on that alone is compared with a new one on its
    own held-out images. A small later source (a few labelled inputs) that cannot be stratified
    is split at random."""
    parts = []
    for source in np.unique(origin):
        members = np.flatnonzero(origin == source)
        kin = None if groups is None else groups[members]
        try:
            split = split_indices(labels[members], validation_split, test_split, seed, kin)
        except DataError:
            if source == 0:
                raise
            split = _random_split(len(members), validation_split, test_split, seed)
        parts.append(Splits(members[split.train], members[split.validation], members[split.test]))
    if len(parts) == 1:
        return parts[0]
    return Splits(*(np.sort(np.concatenate([getattr(p, f) for p in parts])) for f in SPLIT_NAMES))


def _random_split(count: int, validation_split: float, test_split: float, seed: int) -> Splits:
    order = np.random.default_rng(seed).permutation(count)
    test = max(1, round(count * test_split)) if count > 2 else 0
    validation = round(count * validation_split) if count > 3 else 0
    return Splits(
        np.sort(order[test + validation :]),
        np.sort(order[test : test + validation]),
        np.sort(order[:test]),
    )


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Weights inversely proportional to class frequency, so each class adds equally to the loss."""
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return {index: float(weight) for index, weight in enumerate(weights)}


def iterations_per_epoch(num_images: int, batch_size: int) -> int:
    """Gradient-descent steps per epoch: ceil(N / batch); the last batch may be smaller."""
    return -(-num_images // batch_size)


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
    scanned: Scanned | None = None  # the audit's scan and duplicates (None with --audit off)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare_data(config: TrainConfig) -> PreparedData:
    """Load the source of ``config``, select and encode its classes, and split it."""
    images = select_classes(
        load_sources(config.data), config.classes, config.other, config.max_per_class, config.seed
    )
    class_names = class_names_of(images)
    if config.uses_backbone:
        size = config.image_size or BACKBONE_IMAGE_SIZE
    else:
        size = config.image_size or images.native_size or DEFAULT_FOLDER_IMAGE_SIZE
    spec = ImageSpec(
        height=size,
        width=size,
        channels=config.channels or images.channels,
        resize_method=config.resize_method,
    )
    labels = encode_labels(images.names, class_names)
    # The audit's duplicate groups keep copies of one picture within one split.
    scanned = None if config.audit == "off" else scan_images(images)
    groups = None if scanned is None else scanned.duplicates.group_ids(len(images))
    splits = split_by_origin(
        labels, images.origin, config.validation_split, config.test_split, config.seed, groups
    )
    dropped = np.zeros(0, dtype=np.int64)
    if config.drop_duplicates:
        dropped = keep_one_per_group(scanned.duplicates.near, labels)
        splits = without(splits, dropped)
    targets = one_hot(labels, len(class_names))
    return PreparedData(images, class_names, spec, labels, targets, splits, scanned, dropped)


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
