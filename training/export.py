"""Keras -> ONNX export behind a parity gate.

The model is converted from a ``tf.function`` with a dynamic batch dimension (``from_keras`` fails
on Keras 3 models). Before ``model.onnx`` is written, the ONNX model must pass
``onnx.checker`` and agree with Keras on at least 256 held-out images. An int8 model
(``--quantize int8``) is then made from it and must keep the test accuracy within half a point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.core.classifier import available_cpus, open_session
from service.core.contract import ModelContract
from service.core.postprocessing import softmax
from service.core.timing import median_seconds
from training import cam
from training.artifacts import make_readable
from training.data import PreparedData, load_model_inputs
from training.model import block_outputs, detector_model, embed_arrays
from training.ood import NORM_EPSILON, UnknownInputDetector
from training.quantize import QuantizationError, calibration_indices, check_int8, quantize_int8

log = logging.getLogger(__name__)

OPSET = 17
PARITY_MIN_IMAGES = 256
PARITY_MAX_ABS_DIFF = 1e-4
# The unknown-input score may differ by this share of its threshold. The nearest-neighbour
# distance amplifies float32 differences of the features where neighbours are close: 3e-6 to
# 4e-6 on the built-in model, 1.4e-4 on a one-epoch model whose features have nearly collapsed.
# A broken export is off by far more (tests/integration/test_export_and_publish.py).
OOD_PARITY_MAX_RELATIVE_DIFF = 1e-3
# The class activation map (0-1) may differ from Keras's Grad-CAM by this much in any cell.
CAM_PARITY_MAX_ABS_DIFF = 1e-3


class ExportError(Exception):
    """The model could not be exported, or the exported model failed a check."""


@contextlib.contextmanager
def scalar_safe_transpose_optimizer() -> Iterator[None]:
    """tf2onnx's transpose optimizer, minus its crash on a scalar constant added to a Conv without
    bias (MobileNetV3's hard-sigmoid, ``x + 3``): it raised, and tf2onnx then skipped the whole
    pass, leaving about 100 Transpose nodes in the graph (BENCHMARKS.md). Such an Add goes to the
    optimizer's generic handler instead, for the conversions inside this block."""
    from tf2onnx import optimizer
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    class ScalarSafeTransposeOptimizer(TransposeOptimizer):
        def _add_handler(self, trans, node):
            constant = node.inputs[1]
            if constant.is_const() and constant.get_tensor_value(as_list=False).ndim == 0:
                return self._handle_node_having_branches(trans, node)
            return super()._add_handler(trans, node)

    registry = optimizer._optimizers  # the passes tf2onnx runs, by name
    original = registry["optimize_transpose"]
    registry["optimize_transpose"] = ScalarSafeTransposeOptimizer
    try:
        yield
    finally:
        registry["optimize_transpose"] = original


@contextlib.contextmanager
def normalization_as_constants(model) -> Iterator[None]:
    """Keras's ``Normalization`` layer (EfficientNet's first layers) keeps its mean and variance
    as eager tensors, which a traced function captures as extra graph inputs that tf2onnx leaves
    as inputs of the ONNX model. As numpy arrays, for the conversions inside this block, they are
    traced as constants of the graph instead."""
    import keras

    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Normalization) and layer.mean is not None
    ]
    saved = [(layer.mean, layer.variance) for layer in layers]
    for layer in layers:
        layer.mean, layer.variance = np.asarray(layer.mean), np.asarray(layer.variance)
    try:
        yield
    finally:
        for layer, (mean, variance) in zip(layers, saved, strict=True):
            layer.mean, layer.variance = mean, variance


def graph_model(model, mapped: cam.MappedModel | None):
    """The Keras model the exported graph calls once: ``(logits, the detector's features)`` and,
    when the model has a class activation map, its last feature map after them. A backbone's
    pooled features are the detector's, so its mapped model serves both as it is."""
    import keras

    if mapped is None:
        return detector_model(model)
    if not block_outputs(model):
        return mapped.model
    detector = detector_model(model)
    return keras.Model(model.input, [*detector.outputs, mapped.model.outputs[-1]])


def convert_to_onnx(model, contract: ModelContract, detector: UnknownInputDetector | None = None):
    """Convert a Keras model to an ONNX ``ModelProto`` that carries ``contract``.

    The graph takes ``contract.input_name`` float32 ``(N, H, W, C)`` raw 0-255 pixels and returns
    ``contract.output_name`` float32 ``(N, K)`` logits; N is dynamic (named ``batch``). With a
    ``detector`` (and ``contract.ood_output_name``), it also returns the detector's ``(N,)``
    score, computed in the graph from the embedding by the detector's constants. With
    ``contract.cam_output_name``, it also returns the ``(N, h, w)`` class activation map of the
    top class (:mod:`training.cam`), from the same pass.
    """
    import tensorflow as tf
    import tf2onnx

    mapped = cam.mapped_model(model) if contract.cam_output_name else None
    if contract.cam_output_name and mapped is None:
        name = contract.cam_output_name
        raise ExportError(f"the contract names a {name!r} output, but {cam.LEFT_OUT}")
    if detector is None and mapped is None:
        forward = tf.function(lambda image: {contract.output_name: model(image, training=False)})
    else:
        embedder = graph_model(model, mapped)

        def both(image):
            logits, features, *feature_map = embedder(image, training=False)
            outputs = {contract.output_name: logits}
            if mapped is not None:
                outputs[contract.cam_output_name] = cam.class_activation_map(
                    feature_map[0], logits, mapped.kernel
                )
            if detector is None:
                return outputs
            return outputs | {contract.ood_output_name: detector_graph(detector, features)}

        forward = tf.function(both)
    signature = [tf.TensorSpec((None, *contract.image.shape), tf.float32, name=contract.input_name)]
    with scalar_safe_transpose_optimizer(), normalization_as_constants(model):
        proto, _ = tf2onnx.convert.from_function(
            forward, input_signature=signature, opset=contract.opset
        )
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    # The logits first, then the score, then the map (tf2onnx sorts them by name): a client
    # that runs every output and takes the first still gets the logits.
    order = [contract.output_name, contract.ood_output_name, contract.cam_output_name]
    outputs = sorted(proto.graph.output, key=lambda value: order.index(value.name))
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    contract.write_to_onnx(proto)
    return proto


def detector_graph(detector: UnknownInputDetector, features):
    """The detector's ``(N,)`` score of ``(N, sum(widths))`` features as TensorFlow operations,
    the arithmetic of :meth:`UnknownInputDetector.scores` (called inside the traced function:
    constants made there become constants of the graph, made outside they would be captured as
    extra inputs)."""
    import tensorflow as tf

    score = None
    if detector.bank is not None:
        # In float64: near neighbours' similarities are close to 1, and 2 - 2 s in float32
        # would keep only a few digits of their distance.
        edges = np.cumsum((0, *detector.widths))
        scaled = []
        for start, end, scale in zip(edges[:-1], edges[1:], detector.knn_scales, strict=True):
            bank = tf.constant(detector.bank[:, start:end].astype(np.float64))
            part = tf.cast(features[:, start:end], tf.float64)
            normalised = tf.math.l2_normalize(part, axis=1, epsilon=NORM_EPSILON)
            similarities = tf.matmul(normalised, bank, transpose_b=True)
            kth = tf.math.top_k(similarities, k=detector.k, sorted=True).values[:, detector.k - 1]
            distance = tf.cast(tf.sqrt(tf.maximum(2.0 - 2.0 * kth, 0.0)), tf.float32)
            scaled.append(distance / scale)
        score = tf.add_n(scaled) / float(len(scaled))
    if detector.projection is not None:
        projection = tf.constant(detector.projection)
        means = tf.constant(detector.projected_means)
        projected = tf.matmul(features[:, -detector.projection.shape[0] :], projection)
        differences = projected[:, tf.newaxis, :] - means[tf.newaxis, :, :]
        squared = tf.reduce_sum(differences * differences, axis=2)
        distance = tf.sqrt(tf.reduce_min(squared, axis=1)) / detector.mahalanobis_scale
        score = distance if score is None else tf.maximum(score, distance)
    return score


def run_session(session, contract: ModelContract, inputs: np.ndarray) -> np.ndarray:
    """The ONNX model's logits for ``inputs`` (float32 NHWC), through its contract's names."""
    return session.run([contract.output_name], {contract.input_name: inputs})[0]


def check_parity(
    model, session, contract: ModelContract, inputs: np.ndarray, detector=None
) -> dict:
    """Compare Keras and onnxruntime on ``inputs`` (float32 NHWC): softmax probabilities, the
    unknown-input score when the model has a detector, and the class activation map, when the
    model has one, with Keras's Grad-CAM (:func:`training.cam.grad_cam`).

    Returns:
        ``{"images", "max_abs_diff", "argmax_agreement", "passed"}``, with a detector
        ``"ood_max_abs_diff"`` (relative to the threshold) and ``"ood_verdict_agreement"``, and
        with a map ``"cam_max_abs_diff"`` and ``"cam_peak_agreement"``.
    """
    names = [contract.output_name] + ([contract.ood_output_name] if detector else [])
    onnx_outputs = session.run(names, {contract.input_name: inputs})
    if detector is None:
        keras_logits = model.predict(inputs, batch_size=64, verbose=0)
    else:
        keras_logits, features = embed_arrays(detector_model(model), inputs)
    keras_probabilities = softmax(keras_logits)
    onnx_probabilities = softmax(onnx_outputs[0])
    max_abs_diff = float(np.max(np.abs(keras_probabilities - onnx_probabilities)))
    agreement = float(
        np.mean(keras_probabilities.argmax(axis=-1) == onnx_probabilities.argmax(axis=-1))
    )
    figures = {
        "images": int(len(inputs)),
        "max_abs_diff": max_abs_diff,
        "argmax_agreement": agreement,
        "threshold": PARITY_MAX_ABS_DIFF,
        "passed": max_abs_diff <= PARITY_MAX_ABS_DIFF and agreement == 1.0,
    }
    if detector is not None:
        keras_scores, onnx_scores = detector.scores(features), onnx_outputs[1]
        relative = float(np.max(np.abs(keras_scores - onnx_scores)) / detector.threshold)
        verdicts = float(
            np.mean((keras_scores > detector.threshold) == (onnx_scores > detector.threshold))
        )
        figures |= {
            "ood_max_abs_diff_over_threshold": relative,
            "ood_threshold": OOD_PARITY_MAX_RELATIVE_DIFF,
            "ood_verdict_agreement": verdicts,
            "passed": figures["passed"] and relative <= OOD_PARITY_MAX_RELATIVE_DIFF,
        }
    if contract.has_cam:
        figures |= check_cam_parity(model, session, contract, inputs)
        figures["passed"] = figures["passed"] and figures["cam_passed"]
    return figures


def check_cam_parity(model, session, contract: ModelContract, inputs: np.ndarray) -> dict:
    """The ONNX model's ``cam`` output against Keras's Grad-CAM of the same images: the largest
    difference in any cell (both are 0-1), and how often their peaks fall in the same cell."""
    mapped = cam.mapped_model(model)
    if mapped is None:
        return {"cam_passed": False, "cam_max_abs_diff": None, "cam_error": cam.LEFT_OUT}
    if contract.cam_output_name not in [output.name for output in session.get_outputs()]:
        return {"cam_passed": False, "cam_max_abs_diff": None, "cam_error": "no such output"}
    onnx_maps = session.run([contract.cam_output_name], {contract.input_name: inputs})[0]
    keras_maps = cam.grad_cam(mapped, inputs)
    if onnx_maps.shape != keras_maps.shape:
        return {
            "cam_passed": False,
            "cam_max_abs_diff": None,
            "cam_error": f"shape {list(onnx_maps.shape)}, Grad-CAM {list(keras_maps.shape)}",
        }
    difference = float(np.max(np.abs(onnx_maps - keras_maps)))
    peaks = float(
        np.mean(
            onnx_maps.reshape(len(inputs), -1).argmax(axis=1)
            == keras_maps.reshape(len(inputs), -1).argmax(axis=1)
        )
    )
    return {
        "cam_max_abs_diff": difference,
        "cam_threshold": CAM_PARITY_MAX_ABS_DIFF,
        "cam_peak_agreement": peaks,
        "cam_shape": list(onnx_maps.shape[1:]),
        "cam_passed": difference <= CAM_PARITY_MAX_ABS_DIFF,
    }


def measure_latency(model, session, contract: ModelContract, inputs: np.ndarray) -> dict:
    """Median latency of Keras ``predict`` versus onnxruntime for 1 and 32 images."""
    figures = {}
    for batch in (1, 32):
        sample = inputs[:batch]
        keras_seconds = median_seconds(lambda s=sample: model.predict(s, verbose=0), 15)
        onnx_seconds = median_seconds(lambda s=sample: run_session(session, contract, s), 100)
        figures[f"batch_{batch}"] = {
            "keras_predict_ms": round(keras_seconds * 1000, 3),
            "onnxruntime_ms": round(onnx_seconds * 1000, 3),
            "keras_over_onnxruntime": round(keras_seconds / onnx_seconds, 1),
        }
    return figures


def parity_inputs(data: PreparedData, limit: int = PARITY_MIN_IMAGES) -> np.ndarray:
    """Up to ``limit`` model inputs, float32 NHWC: held-out test images first, then validation,
    then training images when the held-out ones are too few (agreement is a numerical check, so
    any real image serves)."""
    order = np.concatenate([data.splits.test, data.splits.validation, data.splits.train])
    return load_model_inputs(data.images, order[:limit], data.spec).astype(np.float32)


def write_onnx(proto, path: Path) -> None:
    """Write atomically, so a reader never sees half a model."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".model.", delete=False) as handle:
        handle.write(proto.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    make_readable(Path(handle.name))
    os.replace(handle.name, path)


def gate(proto, model, inputs: np.ndarray, detector: UnknownInputDetector | None = None) -> dict:
    """Check ``proto`` (``onnx.checker``, then parity with Keras on ``inputs``).

    Returns:
        The export report for ``metadata.json``: format, opset, parity and latency figures.

    Raises:
        ExportError: a check failed.
    """
    import onnx

    contract = ModelContract.read_from_onnx(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker refused the exported model: {exc}") from exc
    # The service's runtime, opened as the service opens it, on every CPU.
    session = open_session(proto.SerializeToString(), available_cpus())
    parity = check_parity(model, session, contract, inputs, detector)
    print(
        f"parity gate: {parity['images']} images, max |p_keras - p_onnx| = "
        f"{parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e}), argmax agreement "
        f"{parity['argmax_agreement']:.2%}"
    )
    if detector is not None:
        print(
            f"parity gate, unknown-input score: max |s_keras - s_onnx| = "
            f"{parity['ood_max_abs_diff_over_threshold']:.2e} of the threshold (limit "
            f"{OOD_PARITY_MAX_RELATIVE_DIFF:.0e}), verdict agreement "
            f"{parity['ood_verdict_agreement']:.2%}"
        )
    if contract.has_cam and parity.get("cam_max_abs_diff") is not None:
        print(
            f"parity gate, class activation map: max |cam_onnx - gradcam_keras| = "
            f"{parity['cam_max_abs_diff']:.2e} (limit {CAM_PARITY_MAX_ABS_DIFF:.0e}), peak "
            f"agreement {parity['cam_peak_agreement']:.2%}"
        )
    if len(inputs) < PARITY_MIN_IMAGES:
        log.warning("only %d images were available for the parity gate", len(inputs))
    if not parity["passed"]:
        detail = f"max abs diff {parity['max_abs_diff']:.2e}, argmax agreement "
        detail += f"{parity['argmax_agreement']:.2%}"
        if detector is not None:
            detail += f", score off by {parity['ood_max_abs_diff_over_threshold']:.2e} of its "
            detail += "threshold"
        if contract.has_cam and not parity["cam_passed"]:
            detail += ", class activation map off Grad-CAM by "
            detail += parity.get("cam_error") or f"{parity['cam_max_abs_diff']:.2e}"
        raise ExportError(
            f"the ONNX model disagrees with Keras ({detail}): nothing was written or published; "
            "check the conversion (opset, custom layers) and export again"
        )
    latency = measure_latency(model, session, contract, inputs)
    for batch, figures in latency.items():
        print(
            f"latency {batch}: Keras predict {figures['keras_predict_ms']} ms, onnxruntime "
            f"{figures['onnxruntime_ms']} ms ({figures['keras_over_onnxruntime']}x)"
        )
    return {
        "format": "onnx",
        "opset": contract.opset,
        "file": "model.onnx",
        "precision": "float32",
        "parity": parity,
        "latency": latency,
        "onnx_checker": "passed",
    }


def quantize_and_gate(proto, data: PreparedData, seed: int) -> tuple:
    """The int8 model of a float32 ``proto`` that passed :func:`gate`, calibrated on training
    images and checked against it on the test split; returns ``(int8 proto, int8 report)``.

    Raises:
        ExportError: the int8 model lost too much accuracy.
    """
    chosen = calibration_indices(data.splits.train, seed)
    calibration = load_model_inputs(data.images, chosen, data.spec).astype(np.float32)
    quantized = quantize_int8(proto, calibration)
    test = data.splits.test
    test_inputs = load_model_inputs(data.images, test, data.spec).astype(np.float32)
    try:
        report = check_int8(proto, quantized, test_inputs, data.targets[test].argmax(axis=-1))
    except QuantizationError as exc:
        raise ExportError(str(exc)) from exc
    return quantized, report | {"calibration_images": int(len(calibration))}


def export_model(
    folder: Path,
    model,
    data: PreparedData,
    contract: ModelContract,
    seed: int = 0,
    detector: UnknownInputDetector | None = None,
) -> dict:
    """Convert, check and write ``model.onnx`` into an artifact folder (staged or complete):
    float32, or int8 when ``contract.precision`` says so (after the float32 model passed).

    Returns:
        The export report (see :func:`gate`), with an ``int8`` section for an int8 model.
    """
    float_contract = dataclasses.replace(contract, precision="float32")
    proto = convert_to_onnx(model, float_contract, detector)
    return write_checked(folder, proto, model, data, contract.precision, seed, detector)


def write_checked(
    folder: Path,
    proto,
    model,
    data: PreparedData,
    precision: str = "float32",
    seed: int = 0,
    detector: UnknownInputDetector | None = None,
) -> dict:
    """:func:`gate` the float32 ``proto`` against ``model``, quantize it when ``precision`` is
    int8, and only when every check passed write ``folder/model.onnx``.

    Raises:
        ExportError: a check failed; nothing was written.
    """
    report = gate(proto, model, parity_inputs(data), detector)
    if precision == "int8":
        proto, report["int8"] = quantize_and_gate(proto, data, seed)
        report["precision"] = "int8"
    write_onnx(proto, folder / "model.onnx")
    return report
