"""The audit as the two jobs run it: ``python -m training audit`` on its own, and the training
job, which audits its data first (``--audit warn|fail|off``) and may act on what it finds."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import keras
import numpy as np

from service.core.preprocessing import ImageSpec
from training.audit.cache import FOLDER, cache_key, cached
from training.audit.report import summary, write_report
from training.audit.run import (
    AuditResult,
    Scanned,
    add_predictions,
    audit,
    out_of_fold,
    scan_images,
)
from training.command_config import AuditConfig
from training.config import TrainConfig
from training.data.labels import class_names_of, encode_labels, select_classes
from training.data.pipelines import load_model_inputs
from training.data.prepare import DEFAULT_FOLDER_IMAGE_SIZE, PreparedData
from training.data.sources import LabelledImages, load_source
from training.data.splits import without
from training.model.backbones import build_backbone_model, resolve_weights
from training.model.cnn import embed_arrays, embedding_model

# The quick model's input side is capped here: it has to be quick.
QUICK_MAX_SIDE = 64
EMBED_CHUNK = 512


class AuditFailed(Exception):
    """``--audit fail`` found what stops a run; the message says what and where the report is."""


def quick_spec(spec: ImageSpec) -> ImageSpec:
    side = min(spec.height, QUICK_MAX_SIDE)
    return dataclasses.replace(spec, height=side, width=min(spec.width, QUICK_MAX_SIDE))


def backbone_features(images: LabelledImages, spec: ImageSpec, backbone: str, weights):
    """Pooled features of a pretrained backbone for every image, in chunks."""
    embedder = embedding_model(build_backbone_model(backbone, spec, 2, weights))
    chunks = []
    for start in range(0, len(images), EMBED_CHUNK):
        indices = np.arange(start, min(start + EMBED_CHUNK, len(images)))
        chunks.append(embed_arrays(embedder, load_model_inputs(images, indices, spec))[1])
    return np.concatenate(chunks)


def predictor(images, labels, classes, spec, backbone, weights, folds, epochs, seed):
    """``() -> OutOfFold`` for :func:`training.audit.run.audit`."""

    def predict():
        if backbone != "cnn":
            features = backbone_features(images, spec, backbone, resolve_weights(backbone, weights))
            return out_of_fold(features, labels, None, classes, folds, epochs, seed)
        small = quick_spec(spec)
        inputs = load_model_inputs(images, np.arange(len(images)), small)
        return out_of_fold(inputs, labels, small, classes, folds, epochs, seed)

    return predict


def quick_side(config: AuditConfig, images: LabelledImages, scanned: Scanned) -> int:
    """The quick model's input side: --image-size, else the median side of the images, at
    most :data:`QUICK_MAX_SIDE`."""
    if config.image_size:
        return min(config.image_size, QUICK_MAX_SIDE)
    inventory = scanned.inventory
    sides = np.minimum(inventory.widths, inventory.heights)
    median = int(np.median(sides)) if len(sides) else DEFAULT_FOLDER_IMAGE_SIZE
    return max(8, min(images.native_size or median, QUICK_MAX_SIDE))


def run_audit_command(config: AuditConfig) -> Path:
    """``python -m training audit``: audit the data and write the report; return its folder."""
    images = select_classes(load_source(config.data), config.classes, None, config.max_per_class)
    class_names = class_names_of(images)
    labels = encode_labels(images.names, class_names)
    scanned = scan_images(images)
    side = quick_side(config, images, scanned)
    spec = ImageSpec(side, side, images.channels)
    predict = None
    if config.label_issues:
        predict = predictor(
            images, labels, len(class_names), spec, config.backbone, config.weights,
            config.folds, config.epochs, config.seed,
        )  # fmt: skip
    result = audit(images, class_names, labels, scanned, predict)
    write_report(result, images, config.output)
    print(summary(result, config.output))
    return config.output


def exclude_suspects(data: PreparedData, result: AuditResult, fraction: float) -> PreparedData:
    """The data without the ``fraction`` of its images most likely mislabelled, taken from the
    training and validation splits only: the test split stays as it is, comparable."""
    if fraction <= 0 or result.issues is None:
        return data
    if not result.labels_judged:
        print("note: --exclude-suspected-labels excludes nothing: the label check is unreliable")
        return data
    held_out = set(data.splits.test.tolist())
    ranked = [i for i in result.issues.ranked.tolist() if i not in held_out]
    count = int(round(fraction * (len(data.splits.train) + len(data.splits.validation))))
    result.excluded = np.asarray(sorted(ranked[:count]), dtype=np.int64)
    return dataclasses.replace(data, splits=without(data.splits, result.excluded, test_too=False))


def failed_audit_folder(config: TrainConfig) -> Path:
    return Path(config.output) / config.name / "failed-audit"


def audit_training_data(config: TrainConfig, data: PreparedData):
    """The training job's audit of its (selected) data: report, stop or act.

    Returns:
        ``(data, result)``: the data without the excluded suspects, and the audit (None with
        ``--audit off``).

    Raises:
        AuditFailed: with ``--audit fail``, on duplicates under different labels or unreadable
            files, found before any model is trained; the report (without label issues) is
            then written to ``<output>/<name>/failed-audit/``.
    """
    if config.audit == "off":
        return data, None
    result = audit(data.images, data.class_names, data.labels, data.scanned)
    result.dropped = data.dropped
    problems = result.blocking()
    if config.audit == "fail" and problems:  # before any model: they need none
        print(summary(result, None))
        folder = failed_audit_folder(config)
        shutil.rmtree(folder, ignore_errors=True)
        write_report(result, data.images, folder)
        raise AuditFailed(
            f"the data audit found {'; '.join(problems)}: fix the data (see {folder / 'report.md'})"
            " or train with --audit warn"
        )
    options = dict(
        spec=data.spec, backbone=config.backbone, weights=config.weights,
        folds=AuditConfig.folds, epochs=AuditConfig.epochs, seed=config.seed,
    )  # fmt: skip
    predict = predictor(data.images, data.labels, data.num_classes, **options)
    # An unchanged data set (--resume after a stop, a rerun) reuses the quick models' answers.
    key = cache_key(data.images, data.labels, classes=data.num_classes, **options)
    add_predictions(result, cached(predict, Path(config.output) / config.name / FOLDER, key))
    # The quick models drew from the global seeds: the run starts as it would without the audit.
    keras.utils.set_random_seed(config.seed)
    data = exclude_suspects(data, result, config.exclude_suspected_labels)
    print(summary(result, None))
    return data, result
