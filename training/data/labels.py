"""Class selection and folding, then integer and one-hot encoding of the labels."""

from __future__ import annotations

import logging

import numpy as np

from training.data.sources import DataError, LabelledImages

log = logging.getLogger(__name__)


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
