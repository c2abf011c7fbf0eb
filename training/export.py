"""Keras -> ONNX export behind a parity gate.

The model is converted from a ``tf.function`` with a dynamic batch dimension (``from_keras`` fails
on Keras 3 models). Before ``model.onnx`` is written, the ONNX model must pass
``onnx.checker`` and agree with Keras on at least 256 held-out images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from service.model import INPUT_NAME, OUTPUT_NAME
from service.postprocessing import softmax
from training import artifacts

log = logging.getLogger(__name__)

OPSET = 17
PARITY_MIN_IMAGES = 256
PARITY_MAX_ABS_DIFF = 1e-4


class ExportError(Exception):
    """The model could not be exported, or the exported model failed a check."""


def convert_to_onnx(model, image_shape: tuple[int, int, int]):
    """Convert a Keras model to an ONNX ``ModelProto``.

    The graph takes ``image`` float32 ``(N, H, W, C)`` raw 0-255 pixels and returns ``logits``
    float32 ``(N, K)``; N is dynamic (named ``batch``).
    """
    import tensorflow as tf
    import tf2onnx

    forward = tf.function(lambda image: {OUTPUT_NAME: model(image, training=False)})
    signature = [tf.TensorSpec((None, *image_shape), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def attach_metadata(proto, metadata: dict) -> None:
    """Store what the service needs in the model file itself (ONNX ``metadata_props``)."""
    props = {
        "labels": json.dumps(metadata["labels"]),
        "image": json.dumps(metadata["image"]),
        "input_range": "0-255",
        "opset": str(OPSET),
        "model_name": metadata["name"],
        "model_version": metadata["version"],
        "metrics": json.dumps(metadata["metrics"]),
        "data_fingerprint": metadata["data"]["fingerprint"],
        "data_source": metadata["data"]["source"],
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "image-classifier-stack"
    proto.doc_string = f"{metadata['name']} {metadata['version']}: image classifier (logits)"


def onnx_session(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def check_parity(model, session, inputs: np.ndarray) -> dict:
    """Compare Keras and onnxruntime softmax probabilities on ``inputs`` (float32 NHWC).

    Returns:
        ``{"images", "max_abs_diff", "argmax_agreement", "passed"}``.
    """
    keras_probabilities = softmax(model.predict(inputs, batch_size=64, verbose=0))
    onnx_probabilities = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0])
    max_abs_diff = float(np.max(np.abs(keras_probabilities - onnx_probabilities)))
    agreement = float(
        np.mean(keras_probabilities.argmax(axis=-1) == onnx_probabilities.argmax(axis=-1))
    )
    return {
        "images": int(len(inputs)),
        "max_abs_diff": max_abs_diff,
        "argmax_agreement": agreement,
        "threshold": PARITY_MAX_ABS_DIFF,
        "passed": max_abs_diff <= PARITY_MAX_ABS_DIFF and agreement == 1.0,
    }


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up: first calls build graphs and caches
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def measure_latency(model, session, inputs: np.ndarray) -> dict:
    """Median latency of Keras ``predict`` versus onnxruntime for 1 and 32 images."""
    figures = {}
    for batch in (1, 32):
        sample = inputs[:batch]
        keras_seconds = _median_seconds(lambda s=sample: model.predict(s, verbose=0), 15)
        onnx_seconds = _median_seconds(
            lambda s=sample: session.run([OUTPUT_NAME], {INPUT_NAME: s}), 100
        )
        figures[f"batch_{batch}"] = {
            "keras_predict_ms": round(keras_seconds * 1000, 3),
            "onnxruntime_ms": round(onnx_seconds * 1000, 3),
            "keras_over_onnxruntime": round(keras_seconds / onnx_seconds, 1),
        }
    return figures


def parity_inputs(data, limit: int = PARITY_MIN_IMAGES) -> np.ndarray:
    """Up to ``limit`` model inputs, float32 NHWC: held-out test images first, then validation,
    then training images when the held-out ones are too few (agreement is a numerical check, so
    any real image serves)."""
    from training.data import load_model_inputs

    order = np.concatenate([data.splits.test, data.splits.validation, data.splits.train])
    return load_model_inputs(data.images, order[:limit], data.spec).astype(np.float32)


def write_onnx(proto, path: Path) -> None:
    """Write atomically, so a reader never sees half a model."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".model.", delete=False) as handle:
        handle.write(proto.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def gate_and_write(folder: Path, proto, model, inputs: np.ndarray) -> dict:
    """Check ``proto`` and, only if every check passes, write ``model.onnx`` and record the
    figures in ``metadata.json``. Raises :class:`ExportError` and writes nothing otherwise."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker refused the exported model: {exc}") from exc
    session = onnx_session(proto)
    parity = check_parity(model, session, inputs)
    print(
        f"parity gate: {parity['images']} images, max |p_keras - p_onnx| = "
        f"{parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e}), argmax agreement "
        f"{parity['argmax_agreement']:.2%}"
    )
    if len(inputs) < PARITY_MIN_IMAGES:
        log.warning("only %d images were available for the parity gate", len(inputs))
    if not parity["passed"]:
        raise ExportError(
            f"the ONNX model disagrees with Keras (max abs diff {parity['max_abs_diff']:.2e}, "
            f"argmax agreement {parity['argmax_agreement']:.2%}): nothing was written or "
            "published; check the conversion (opset, custom layers) and export again"
        )
    latency = measure_latency(model, session, inputs)
    for batch, figures in latency.items():
        print(
            f"latency {batch}: Keras predict {figures['keras_predict_ms']} ms, onnxruntime "
            f"{figures['onnxruntime_ms']} ms ({figures['keras_over_onnxruntime']}x)"
        )
    write_onnx(proto, folder / "model.onnx")
    metadata = artifacts.read_json(folder / "metadata.json")
    metadata["export"] = {
        "format": "onnx",
        "opset": OPSET,
        "file": "model.onnx",
        "parity": parity,
        "latency": latency,
        "onnx_checker": "passed",
    }
    artifacts.write_json(folder / "metadata.json", metadata)
    return metadata["export"]


def export_artifact(folder: Path, model, data) -> dict:
    """Convert, check and write ``model.onnx`` into an artifact folder (staged or complete)."""
    metadata = artifacts.read_json(folder / "metadata.json")
    proto = convert_to_onnx(model, data.spec.shape)
    attach_metadata(proto, metadata)
    return gate_and_write(folder, proto, model, parity_inputs(data))


def reexport(config) -> str | None:
    """``python -m training export``: export an existing artifact again and publish it."""
    import keras

    from training.config import TrainConfig
    from training.train import prepare_data

    folder = artifacts.resolve_artifact(config.artifact)
    metadata = artifacts.read_json(folder / "metadata.json")
    train_config = TrainConfig.from_dict(metadata["config"])
    data = prepare_data(train_config)
    if data.images.fingerprint != metadata["data"]["fingerprint"]:
        raise ExportError(
            f"the data {metadata['data']['source']} changed since {folder} was trained "
            "(fingerprint differs), so its held-out images cannot be rebuilt: train again"
        )
    model = keras.saving.load_model(folder / "model.keras")
    export_artifact(folder, model, data)
    print(f"exported {folder / 'model.onnx'}")
    if not config.publish:
        return None
    from training.publish import publish_artifact

    tag = publish_artifact(folder)
    print(f"published to the BentoML model store as {tag}")
    return tag
