"""Stratified train/validation/test splits that keep duplicate groups and origins together, and
balanced class weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight

from training.data.sources import DataError

log = logging.getLogger(__name__)


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
