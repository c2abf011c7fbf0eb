"""Writing ``model.onnx``: convert, gate, quantize when asked, measure, and only then write.

Everything here runs after the model passed its checks or not at all: a failed check leaves
nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from service.core.contract import ModelContract
from training.data.pipelines import load_model_inputs
from training.data.prepare import PreparedData
from training.export.convert import ExportError, convert_to_onnx, write_onnx
from training.export.gate import gate, parity_inputs, service_session
from training.export.latency import report_latency
from training.export.quantize import (
    QuantizationError,
    calibration_indices,
    check_int8,
    quantize_int8,
)
from training.quality.detector import UnknownInputDetector


def quantize_and_gate(proto, data: PreparedData, seed: int) -> tuple:
    """The int8 model of a float32 ``proto`` that passed :func:`~training.export.gate.gate`,
    calibrated on training images and checked against it on the test split; returns
    ``(int8 proto, int8 report)``.

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
        The export report (see :func:`~training.export.gate.gate`), with an ``int8`` section
        for an int8 model.
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
    """:func:`~training.export.gate.gate` the float32 ``proto`` against ``model``, measure its
    latency, quantize it when ``precision`` is int8, and only when every check passed write
    ``folder/model.onnx``.

    Raises:
        ExportError: a check failed; nothing was written.
    """
    inputs = parity_inputs(data)
    session = service_session(proto)
    report = gate(proto, model, inputs, detector, session)
    contract = ModelContract.read_from_onnx(proto)
    report["latency"] = report_latency(model, session, contract, inputs)
    if precision == "int8":
        proto, report["int8"] = quantize_and_gate(proto, data, seed)
        report["precision"] = "int8"
    write_onnx(proto, folder / "model.onnx")
    return report
