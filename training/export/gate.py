"""The parity gate: before ``model.onnx`` is written, the ONNX model must pass ``onnx.checker``
and agree with Keras on at least 256 held-out images (probabilities, the unknown-input score,
the class activation map). An int8 model (``--quantize int8``) is then made from it and must
keep the test accuracy within half a point."""

from __future__ import annotations

import logging

import numpy as np

from service.core.classifier import available_cpus, open_session
from service.core.contract import ModelContract
from service.core.postprocessing import softmax
from training.data.pipelines import load_model_inputs
from training.data.prepare import PreparedData
from training.export.convert import ExportError
from training.model import cam
from training.model.cnn import detector_model, embed_arrays
from training.quality.detector import UnknownInputDetector

log = logging.getLogger(__name__)


PARITY_MIN_IMAGES = 256
PARITY_MAX_ABS_DIFF = 1e-4
# The unknown-input score may differ by this share of its threshold. The nearest-neighbour
# distance amplifies float32 differences of the features where neighbours are close: 3e-6 to
# 4e-6 on the built-in model, 1.4e-4 on a one-epoch model whose features have nearly collapsed.
# A broken export is off by far more (tests/integration/test_export_and_publish.py).
OOD_PARITY_MAX_RELATIVE_DIFF = 1e-3
# The class activation map (0-1) may differ from Keras's Grad-CAM by this much in any cell.
CAM_PARITY_MAX_ABS_DIFF = 1e-3


def run_session(session, contract: ModelContract, inputs: np.ndarray) -> np.ndarray:
    """The ONNX model's logits for ``inputs`` (float32 NHWC), through its contract's names."""
    return session.run([contract.output_name], {contract.input_name: inputs})[0]


def service_session(proto):
    """The service's runtime for ``proto``, opened as the service opens it, on every CPU."""
    return open_session(proto.SerializeToString(), available_cpus())


def check_parity(
    model, session, contract: ModelContract, inputs: np.ndarray, detector=None
) -> dict:
    """Compare Keras and onnxruntime on ``inputs`` (float32 NHWC): softmax probabilities, the
    unknown-input score when the model has a detector, and the class activation map, when the
    model has one, with Keras's Grad-CAM (:func:`training.model.cam.grad_cam`).

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


def parity_inputs(data: PreparedData, limit: int = PARITY_MIN_IMAGES) -> np.ndarray:
    """Up to ``limit`` model inputs, float32 NHWC: held-out test images first, then validation,
    then training images when the held-out ones are too few (agreement is a numerical check, so
    any real image serves)."""
    order = np.concatenate([data.splits.test, data.splits.validation, data.splits.train])
    return load_model_inputs(data.images, order[:limit], data.spec).astype(np.float32)


def gate(
    proto,
    model,
    inputs: np.ndarray,
    detector: UnknownInputDetector | None = None,
    session=None,
) -> dict:
    """Check ``proto`` (``onnx.checker``, then parity with Keras on ``inputs``), in ``session``
    when one is given (the service's runtime on every CPU otherwise).

    Returns:
        The export report for ``metadata.json``: format, opset and parity figures.

    Raises:
        ExportError: a check failed.
    """
    import onnx

    contract = ModelContract.read_from_onnx(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker refused the exported model: {exc}") from exc
    if session is None:
        session = service_session(proto)
    parity = check_parity(model, session, contract, inputs, detector)
    print_parity(parity, contract, detector is not None)
    if len(inputs) < PARITY_MIN_IMAGES:
        log.warning("only %d images were available for the parity gate", len(inputs))
    if not parity["passed"]:
        raise ExportError(
            f"the ONNX model disagrees with Keras ({failure_detail(parity, contract, detector)}): "
            "nothing was written or published; check the conversion (opset, custom layers) and "
            "export again"
        )
    return {
        "format": "onnx",
        "opset": contract.opset,
        "file": "model.onnx",
        "precision": "float32",
        "parity": parity,
        "onnx_checker": "passed",
    }


def print_parity(parity: dict, contract: ModelContract, with_detector: bool) -> None:
    """The gate's lines: probabilities, then the unknown-input score and the map when the model
    has them."""
    print(
        f"parity gate: {parity['images']} images, max |p_keras - p_onnx| = "
        f"{parity['max_abs_diff']:.2e} (limit {PARITY_MAX_ABS_DIFF:.0e}), argmax agreement "
        f"{parity['argmax_agreement']:.2%}"
    )
    if with_detector:
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


def failure_detail(parity: dict, contract: ModelContract, detector) -> str:
    """What a failed gate was off by, for its one error line."""
    detail = f"max abs diff {parity['max_abs_diff']:.2e}, argmax agreement "
    detail += f"{parity['argmax_agreement']:.2%}"
    if detector is not None:
        detail += f", score off by {parity['ood_max_abs_diff_over_threshold']:.2e} of its "
        detail += "threshold"
    if contract.has_cam and not parity["cam_passed"]:
        detail += ", class activation map off Grad-CAM by "
        detail += parity.get("cam_error") or f"{parity['cam_max_abs_diff']:.2e}"
    return detail
