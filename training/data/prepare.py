"""The prepared data of a run: the sources read, the audit's scan, near-duplicates dropped,
labels encoded and split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from service.core.preprocessing import (
    ImageSpec,
)
from training.config import BACKBONE_IMAGE_SIZE, TrainConfig
from training.data.duplicates import keep_one_per_group
from training.data.labels import class_names_of, encode_labels, one_hot, select_classes
from training.data.scan import Scanned, scan_images
from training.data.sources import LabelledImages, load_sources
from training.data.splits import Splits, split_by_origin, without

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
