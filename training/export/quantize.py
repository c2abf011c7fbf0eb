"""int8 models by onnxruntime's static quantization, behind an accuracy gate.

The float32 model that passed the parity gate is quantized with ``onnxruntime.quantization``:
QDQ format, per-tensor int8 weights and uint8 activations, with activation ranges calibrated on
training images. The int8 model is shipped only if its test accuracy is at most
:data:`MAX_ACCURACY_LOSS_POINTS` below the float32 model's. Its interface is unchanged (float32
raw pixels in, logits out), so the service runs it as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from service.core.classifier import open_session
from service.core.contract import ModelContract
from service.core.timing import median_seconds

CALIBRATION_IMAGES = 512
MAX_ACCURACY_LOSS_POINTS = 0.5


class QuantizationError(Exception):
    """The int8 model failed its accuracy gate; the message names the figures and the fix."""


def quantize_int8(proto, calibration: np.ndarray, batch_size: int = 32):
    """onnxruntime static quantization of an ONNX ``ModelProto`` that carries a contract.

    Args:
        calibration: float32 model inputs (N, H, W, C) from which activation ranges are set.

    Returns:
        The int8 ``ModelProto``, carrying the same contract with ``precision="int8"``.
    """
    import dataclasses

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    contract = ModelContract.read_from_onnx(proto)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            starts = range(0, len(calibration), batch_size)
            self._batches = iter(
                [{contract.input_name: calibration[start : start + batch_size]} for start in starts]
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as scratch:
        source, prepared, target = (Path(scratch) / n for n in ("f32", "pre", "int8"))
        onnx.save(proto, source)
        # Shape inference and graph clean-up first, as onnxruntime recommends; its symbolic
        # shape inference (sympy) is for transformer graphs and not needed here.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # Per-tensor weights: per-channel int8 weights saturate in the u8s8 kernels of CPUs
        # without VNNI (measured: accuracy fell to chance on this machine's AVX2).
        quantize_static(
            str(prepared),
            str(target),
            Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            # The unknown-input score's own arithmetic stays float32, so the score keeps the
            # scale its threshold was set on. (Quantizing the convolutions alone was measured
            # too: the extra quantize/dequantize pairs around them cancelled the gain.) So does
            # the class activation map's, computed from the (quantized) feature map.
            nodes_to_exclude=detector_only_nodes(proto, contract) + map_only_nodes(proto, contract),
        )
        quantized = onnx.load(str(target))
    dataclasses.replace(contract, precision="int8").write_to_onnx(quantized)
    return quantized


def detector_only_nodes(proto, contract: ModelContract) -> list[str]:
    """Names of the graph nodes that compute only the unknown-input score (not the logits)."""
    if not contract.has_detector:
        return []
    return nodes_only_for(proto, contract.ood_output_name, contract.output_name)


def map_only_nodes(proto, contract: ModelContract) -> list[str]:
    """Names of the graph nodes that compute only the class activation map (not the logits)."""
    if not contract.has_cam:
        return []
    return nodes_only_for(proto, contract.cam_output_name, contract.output_name)


def nodes_only_for(proto, output: str, other: str) -> list[str]:
    """Names of the nodes that ``output`` needs and ``other`` does not."""
    producer = {name: node for node in proto.graph.node for name in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen, stack = set(), [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    return sorted(ancestors(output) - ancestors(other))


def calibration_indices(indices: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`CALIBRATION_IMAGES` of the training ``indices``, drawn at random, so that
    only those images are ever loaded."""
    if len(indices) <= CALIBRATION_IMAGES:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, CALIBRATION_IMAGES, replace=False))


def one_thread_session(proto):
    """The service's session of ``proto`` on one thread, where timings compare models."""
    return open_session(proto.SerializeToString(), threads=1)


def _outputs(session, names: list[str], feed_name: str, inputs: np.ndarray, batch: int = 256):
    """Every named output of the model over ``inputs``, in batches, concatenated."""
    runs = [
        session.run(names, {feed_name: inputs[start : start + batch]})
        for start in range(0, len(inputs), batch)
    ]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def batch_1_microseconds(session, contract: ModelContract, image: np.ndarray, repeats=500) -> float:
    """Median onnxruntime time of one image, one thread."""
    feed = {contract.input_name: image[np.newaxis]}
    seconds = median_seconds(lambda: session.run([contract.output_name], feed), repeats, warmup=20)
    return round(seconds * 1e6, 1)


def check_int8(
    float_proto,
    int8_proto,
    test_inputs: np.ndarray,
    test_labels: np.ndarray,
    max_loss_points: float = MAX_ACCURACY_LOSS_POINTS,
) -> dict:
    """Compare the int8 model with the float32 one on the test split, then gate it.

    Returns:
        ``{"test_accuracy_float32", "test_accuracy_int8", "loss_points", "top1_agreement",
        "batch_1_us_float32", "batch_1_us_int8", "speedup", "max_loss_points", "images"}``.

    Raises:
        QuantizationError: the int8 model loses more than ``max_loss_points`` of accuracy.
    """
    contract = ModelContract.read_from_onnx(float_proto)
    sessions = {name: one_thread_session(p) for name, p in (("f", float_proto), ("q", int8_proto))}
    names = [contract.output_name] + ([contract.ood_output_name] if contract.has_detector else [])
    outputs = {
        name: _outputs(session, names, contract.input_name, test_inputs)
        for name, session in sessions.items()
    }
    predicted = {name: logits.argmax(axis=-1) for name, (logits, *_) in outputs.items()}
    flagged = {
        name: round(float(np.mean(rest[0] > contract.ood_threshold)), 4)
        for name, (_, *rest) in outputs.items()
        if rest
    }
    accuracy = {name: float(np.mean(labels == test_labels)) for name, labels in predicted.items()}
    timing = {
        name: batch_1_microseconds(session, contract, test_inputs[0])
        for name, session in sessions.items()
    }
    loss = round((accuracy["f"] - accuracy["q"]) * 100, 2)
    report = {
        "images": int(len(test_inputs)),
        "test_accuracy_float32": round(accuracy["f"], 4),
        "test_accuracy_int8": round(accuracy["q"], 4),
        "loss_points": loss,
        "max_loss_points": max_loss_points,
        "top1_agreement": round(float(np.mean(predicted["f"] == predicted["q"])), 4),
        "batch_1_us_float32": timing["f"],
        "batch_1_us_int8": timing["q"],
        "speedup": round(timing["f"] / timing["q"], 2),
    }
    if flagged:
        # The detector's arithmetic stays float32, but it reads the int8 model's embedding.
        report |= {"test_flagged_float32": flagged["f"], "test_flagged_int8": flagged["q"]}
    print(
        f"int8 gate: {report['images']} test images, accuracy {accuracy['f']:.4f} -> "
        f"{accuracy['q']:.4f} ({-loss:+.2f} points, limit -{max_loss_points}), top-1 agreement "
        f"{report['top1_agreement']:.2%}; onnxruntime batch 1, one thread: "
        f"{timing['f']} -> {timing['q']} us ({report['speedup']}x)"
    )
    if loss > max_loss_points:
        raise QuantizationError(
            f"the int8 model loses {loss:.2f} points of test accuracy (limit "
            f"{max_loss_points}): nothing was written or published; train again without "
            "--quantize int8 to ship the float32 model"
        )
    return report
