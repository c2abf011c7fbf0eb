"""The training run, step by step: prepare -> fit -> evaluate -> calibrate and detect -> write ->
ship. Steps hand each other objects in memory; the artifact folder is the output."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from service.core.contract import ModelContract
from service.core.drift import REFERENCE_FILE, DriftReference, build_reference
from service.core.postprocessing import softmax
from training import artifacts
from training.audit.job import audit_training_data
from training.audit.report import write_report
from training.config import TrainConfig
from training.data.pipelines import (
    augmentation_of,
    iterations_per_epoch,
    load_model_inputs,
    make_dataset,
)
from training.data.prepare import PreparedData, prepare_data
from training.data.splits import balanced_class_weights
from training.export.convert import OPSET
from training.export.publish import publish_artifact
from training.export.write import export_model
from training.fit.checkpoints import backup_dir
from training.fit.distribute import is_chief, make_strategy
from training.fit.fitting import DatasetFactory, Fitted, fit_model, phase_summary
from training.model import cam
from training.model.backbones import resolve_weights
from training.model.cnn import (
    block_outputs,
    build_compiled_model,
    detector_model,
    detector_widths,
    embed_arrays,
    predict_embeddings,
)
from training.quality import plots
from training.quality.calibration import calibration_report
from training.quality.compare import ModelRefused, compare_models, format_comparison, open_reference
from training.quality.detector import (
    DETECTOR_FILE,
    OOD_OUTPUT_NAME,
    UnknownInputDetector,
    fit_detector,
    threshold_for,
)
from training.quality.evaluate import evaluation_report, format_report
from training.quality.outliers import detection_report, format_detection, outlier_sets
from training.summary import (
    build_metadata,
    contract_metrics,
    data_lines,
    fit_plan_line,
    training_figures,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything fitting needs: the data, how to batch it, the class weights, the compiled
    model and the tf.distribute strategy it lives under."""

    data: PreparedData
    dataset: DatasetFactory
    class_weight: dict | None
    model: keras.Model
    strategy: object
    chief: bool  # only the chief of a multi-worker run evaluates and writes
    audit: object | None = None  # the data audit's findings (None with --audit off)


@dataclass
class Evaluated:
    """The trained model judged on held-out images: its report (test metrics, calibration,
    unknown inputs) and its unknown-input detector."""

    report: dict
    detector: UnknownInputDetector
    # What the service's drift checks compare with (None without a validation split).
    reference: DriftReference | None = None


def run_training(config: TrainConfig) -> Path | None:
    """Train, evaluate and write one complete artifact version, export and publish it; return its
    folder (None on a worker that is not the chief of a multi-worker run: only the chief writes
    artifacts)."""
    started = time.monotonic()
    prepared = prepare(config)
    fitted = fit_model(
        config,
        prepared.model,
        prepared.strategy,
        prepared.data,
        prepared.dataset,
        prepared.class_weight,
    )
    if not prepared.chief:
        print("training finished on this worker; the chief evaluates and writes the artifacts")
        return None
    model = plain_model(config, prepared)
    evaluated = evaluate(config, prepared, model, fitted)
    final, contract, metadata = write(config, prepared, model, fitted, evaluated)
    print(f"artifacts: {final} ({time.monotonic() - started:.0f} s in all)")
    ship(config, final, contract, metadata, evaluated.report.get("comparison"))
    return final


def prepare(config: TrainConfig) -> Prepared:
    """The weights (first of all: a download that cannot work fails in seconds, not after the
    data), the strategy, the seed, the data and its splits, and the compiled model."""
    weights = None
    if config.uses_backbone:
        weights = resolve_weights(config.backbone, config.weights)
        if weights is None:
            print(
                f"note: --weights none: {config.backbone} starts from random weights, whose "
                "features teach the head nothing; for tests and smoke runs"
            )
    if config.compare_with:
        open_reference(config.compare_with)  # a model that is not there fails now, not after
    strategy, tf_config = make_strategy(config.distribute)  # before any other TensorFlow op
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = prepare_data(config)
    data, audit = audit_training_data(config, data)  # the data audit: report, stop or act
    class_weight = None
    if config.other is not None:
        class_weight = balanced_class_weights(data.labels[data.splits.train], data.num_classes)
    print("\n".join(data_lines(config, data, class_weight)))

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
            augmentation=augmentation_of(config),
        )

    steps = iterations_per_epoch(len(data.splits.train), config.batch_size)
    with strategy.scope():
        model = build_compiled_model(config, data.spec, data.num_classes, weights, steps)
    if config.distribute != "none":
        print(
            f"distributed: {strategy.num_replicas_in_sync} replicas in sync; --batch-size "
            f"{config.batch_size} is the global batch, split across them"
        )
    print(fit_plan_line(config, len(data.splits.train)))
    return Prepared(data, dataset, class_weight, model, strategy, is_chief(tf_config), audit)


def plain_model(config: TrainConfig, prepared: Prepared) -> keras.Model:
    """The trained model, as a plain copy when it was trained distributed: distributed
    variables do not convert to ONNX."""
    if config.distribute == "none":
        return prepared.model
    data = prepared.data
    trained = build_compiled_model(config, data.spec, data.num_classes)
    trained.set_weights(prepared.model.get_weights())
    return trained


def evaluate(config: TrainConfig, prepared: Prepared, model, fitted: Fitted) -> Evaluated:
    """The test split's metrics, then the calibration and the unknown-input detector."""
    data = prepared.data
    embedder = detector_model(model)
    test = predict_embeddings(embedder, prepared.dataset(data.splits.test))
    report = evaluation_report(test[2], test[0], data.class_names)
    if fitted.phases is not None:
        report["training_phases"] = phase_summary(fitted.history, fitted.phases)
    print(format_report(report))
    detector, report["calibration"], report["unknown_inputs"], reference = calibrate_and_detect(
        config, prepared, embedder, test, detector_widths(model), not block_outputs(model)
    )
    if reference is not None:
        report["drift_reference"] = {
            "images": reference.size,
            "validation_accuracy": round(reference.accuracy, 4),
            "atc_threshold": round(reference.atc_threshold, 6),
        }
    return Evaluated(report, detector, reference)


def calibrate_and_detect(
    config: TrainConfig,
    prepared: Prepared,
    embedder,
    test,
    widths: tuple[int, ...],
    mahalanobis: bool,
) -> tuple:
    """Fit the temperature and the unknown-input detector, and measure both on the test split
    and on inputs that no class covers.

    Args:
        embedder: the trained model returning ``(logits, detector features)``
            (:func:`training.model.cnn.detector_model`).
        test: ``(logits, features, labels)`` of the test split.
        widths: each layer's width in the features.
        mahalanobis: add the Mahalanobis part (a backbone, whose features are one layer).

    Returns:
        ``(detector with its threshold, calibration report, detection report, drift
        reference)``: the reference holds the validation split's calibrated scores, detector
        scores and a sample of its features, and the ATC threshold fitted on it (None without a
        validation split).
    """
    data, dataset, splits = prepared.data, prepared.dataset, prepared.data.splits
    test_logits, test_features, test_labels = test
    _, train_features, train_labels = predict_embeddings(embedder, dataset(splits.train))
    if len(splits.validation):
        held_out = predict_embeddings(embedder, dataset(splits.validation))
    else:
        log.warning("no validation split: temperature 1 and the threshold set on training images")
        held_out = (np.zeros((0, data.num_classes)), train_features, np.zeros(0, dtype=int))
    validation_logits, validation_features, validation_labels = held_out
    calibration = calibration_report(
        validation_logits, validation_labels, test_logits, test_labels, config.seed
    )
    temperature = calibration["temperature"]
    detector = fit_detector(
        train_features, train_labels, data.num_classes, widths, config.seed, mahalanobis=mahalanobis
    )
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
    reference = None
    if len(validation_labels):
        reference = build_reference(
            softmax(validation_logits / temperature),
            validation_labels,
            detector.scores(validation_features),
            train_labels,
            validation_features,
            config.seed,
        )
    return detector, calibration, detection, reference


def write(
    config: TrainConfig, prepared: Prepared, model, fitted: Fitted, evaluated: Evaluated
) -> tuple[Path, ModelContract, dict]:
    """Write one artifact version (the model, its contract, history, report, plots, detector,
    and ``model.onnx`` through the parity gate) under a staging name, renamed into place only
    when complete.

    Returns:
        ``(the version's folder, its contract, its metadata)``.
    """
    data, report, detector = prepared.data, evaluated.report, evaluated.detector

    def accepted() -> bool:
        return config.latest and report.get("comparison", {}).get("accepted", True)

    with artifacts.staged_version(config.output, config.name, accepted) as (folder, version):
        contract = ModelContract(
            name=config.name,
            version=version,
            labels=tuple(data.class_names),
            image=data.spec,
            opset=OPSET,
            metrics=contract_metrics(report, fitted.history),
            data_source=data.images.source,
            data_fingerprint=data.images.fingerprint,
            precision=config.precision,
            temperature=report["calibration"]["temperature"],
            ood_output_name=OOD_OUTPUT_NAME,
            ood_threshold=detector.threshold,
            drift_reference=REFERENCE_FILE if evaluated.reference is not None else "",
            **cam.contract_fields(model),
        )
        model.save(folder / "model.keras")
        artifacts.write_json(folder / "labels.json", contract.to_labels_file())
        artifacts.write_json(folder / "history.json", fitted.history)
        plot_run(folder / "plots", fitted.history, report, data.class_names)
        detector.save(folder / DETECTOR_FILE)
        if evaluated.reference is not None:
            evaluated.reference.save(folder / REFERENCE_FILE)
        if prepared.audit is not None:
            write_report(prepared.audit, data.images, folder / "audit")
        training = training_figures(config, fitted, len(data.splits.train), prepared.class_weight)
        metadata = build_metadata(config, contract, data, training)
        if config.export:
            metadata["export"] = export_model(folder, model, data, contract, config.seed, detector)
        if config.compare_with:
            report["comparison"] = compare_models(folder, config.compare_with, data)
            print(format_comparison(report["comparison"]))
        artifacts.write_json(folder / "report.json", report)
        artifacts.write_json(folder / "metadata.json", metadata)
    return Path(config.output) / config.name / version, contract, metadata


def plot_run(folder: Path, history: dict, report: dict, class_names: list[str]) -> None:
    """The learning curves, the confusion matrix and the reliability diagram."""
    plots.plot_training(history, folder)
    plots.plot_confusion_matrix(
        report["confusion_matrix"], class_names, folder / "confusion_matrix.png"
    )
    plots.plot_reliability(report["calibration"], folder / "reliability.png")


def ship(
    config: TrainConfig,
    final: Path,
    contract: ModelContract,
    metadata: dict,
    comparison: dict | None = None,
) -> None:
    """Drop the resumable state (the run is complete) and publish the exported model, unless
    the comparison with the model it would replace refused it.

    Raises:
        ModelRefused: the comparison found it worse; it stays an artifact, not ``latest``.
    """
    if config.distribute != "multi-worker":
        shutil.rmtree(backup_dir(config), ignore_errors=True)  # nothing to resume
    if comparison is not None and not comparison["accepted"]:
        raise ModelRefused(
            f"{final} is worse than {comparison['old_model']['version']} on "
            f"{', '.join(comparison['worse_on'])} (McNemar, 5%): kept as an artifact, not "
            "published, latest unchanged"
        )
    if not config.latest:
        print(f"a challenger: {final}, not latest and not published")
    elif config.export and config.publish:
        tag = publish_artifact(final, contract, metadata["export"], metadata["git_commit"])
        print(f"published to the BentoML model store as {tag}")
