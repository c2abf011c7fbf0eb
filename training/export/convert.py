"""Keras -> ONNX: the model converted from a ``tf.function`` with a dynamic batch dimension
(``from_keras`` fails on Keras 3 models), the unknown-input score and the class activation map
as extra outputs of the same graph, and the file written atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from service.core.contract import ModelContract
from training.artifacts import make_readable
from training.model import cam
from training.model.cnn import block_outputs, detector_model
from training.quality.detector import NORM_EPSILON, UnknownInputDetector

log = logging.getLogger(__name__)


class ExportError(Exception):
    """The model could not be exported, or the exported model failed a check."""


OPSET = 17


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
    top class (:mod:`training.model.cam`), from the same pass.
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


def write_onnx(proto, path: Path) -> None:
    """Write atomically, so a reader never sees half a model."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".model.", delete=False) as handle:
        handle.write(proto.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    make_readable(Path(handle.name))
    os.replace(handle.name, path)
