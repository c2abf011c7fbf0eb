"""The Open Inference Protocol (KServe V2 / Triton) over REST: decode infer requests, encode
responses, in plain JSON or with the binary tensor extension that ``tritonclient.http`` uses by
default (a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensors)."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import numpy as np

from service.core.contract import ModelContract
from service.core.postprocessing import UNKNOWN_LABEL, Answers
from service.http.bodies import parse_json
from service.http.errors import ApiError

HEADER_LENGTH = "inference-header-content-length"
PROBABILITIES = "probabilities"
# (N,) FP32: the unknown-input score, for a model with a detector; above the threshold in
# GET /v2/models/<name>'s parameters, the input is unlike the training images.
OOD_SCORE = "ood_score"
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}


@dataclass
class InferRequest:
    """A decoded infer request: the image batch and what the client wants back."""

    id: str | None
    images: np.ndarray  # (N, H, W, C), uint8 or float32, raw 0-255 pixels
    outputs: list[dict]  # requested outputs, each {"name", "binary", "classification"}


# Characters of JSON per tensor value at most ("255.00000000000001, "), and room for the rest.
JSON_BYTES_PER_VALUE = 24
JSON_OVERHEAD_BYTES = 64 * 1024
_ASCII_DIGITS = re.compile(r"^[0-9]{1,12}$")
MAX_ID_LENGTH = 256


def _bad(code: str, detail: str) -> ApiError:
    return ApiError(400, code, detail)


def max_body_bytes(contract: ModelContract, max_batch: int) -> int:
    """The largest infer request this model can need: ``max_batch`` images as JSON numbers (or
    as FP32 binary, which is smaller). Anything larger is refused before it is read."""
    values = max_batch * int(np.prod(contract.image.shape))
    return values * JSON_BYTES_PER_VALUE + JSON_OVERHEAD_BYTES


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_bytes, binary = body, b""
    else:
        if not _ASCII_DIGITS.match(header_length) or int(header_length) > len(body):
            raise _bad(
                "invalid_header", "Inference-Header-Content-Length is not a length within the body"
            )
        json_bytes, binary = body[: int(header_length)], body[int(header_length) :]
    header = parse_json(json_bytes, "the inference request")
    if not isinstance(header, dict):
        raise _bad("invalid_json", "the inference request must be a JSON object")
    return header, binary


def _parameters(entry: dict, where: str) -> dict:
    """An object's ``parameters``: absent, null or a JSON object, else 400."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise _bad("invalid_parameters", f"{where}'parameters' must be a JSON object")
    return parameters


def _flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise _bad("invalid_parameters", f"parameter {name!r} must be true or false")
    return value


def _is_count(value: object) -> bool:
    """A JSON integer (``true`` is not one, though Python counts it as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def output_names(contract: ModelContract) -> list[str]:
    """The outputs an infer request gets when it names none."""
    return [PROBABILITIES] + ([OOD_SCORE] if contract.has_detector else [])


def requestable_outputs(contract: ModelContract) -> list[str]:
    """Those, and the ``(N, h, w)`` FP32 class activation map of the top class, which a request
    gets only by naming it (the model's own output name, ``cam``)."""
    return output_names(contract) + ([contract.cam_output_name] if contract.has_cam else [])


def _requested_outputs(header: dict, contract: ModelContract) -> list[dict]:
    binary_default = _flag(_parameters(header, ""), "binary_data_output", False)
    requested = header.get("outputs")
    if requested is None:
        defaults = output_names(contract)
        return [{"name": name, "binary": binary_default, "classification": 0} for name in defaults]
    available = requestable_outputs(contract)
    if not isinstance(requested, list):
        raise _bad("invalid_outputs", "'outputs' must be a list")
    outputs = []
    for entry in requested:
        if not isinstance(entry, dict) or entry.get("name") not in available:
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise _bad(
                "unknown_output",
                f"unknown output {name!r}: this model has {', '.join(map(repr, available))}",
            )
        params = _parameters(entry, f"output {entry['name']!r}: ")
        classification = params.get("classification", 0)
        if not _is_count(classification) or classification < 0:
            raise _bad("invalid_classification", "'classification' must be a count >= 0")
        if classification and entry["name"] != PROBABILITIES:
            raise _bad("invalid_classification", f"'classification' applies to {PROBABILITIES!r}")
        outputs.append(
            {
                "name": entry["name"],
                "binary": _flag(params, "binary_data", binary_default),
                "classification": classification,
            }
        )
    return outputs


def model_metadata(contract: ModelContract) -> dict:
    """The model metadata response: one input of raw pixels; the probabilities, the
    unknown-input score for a model with a detector, and the class activation map for a model
    with one."""
    spec = contract.image
    outputs = [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, contract.num_classes]}]
    if contract.has_detector:
        outputs.append({"name": OOD_SCORE, "datatype": "FP32", "shape": [-1]})
    if contract.has_cam:
        shape = [-1, *contract.cam_shape]
        outputs.append({"name": contract.cam_output_name, "datatype": "FP32", "shape": shape})
    return {
        "name": contract.name,
        "versions": [contract.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": contract.input_name,
                "datatype": "FP32",
                "shape": [-1, spec.height, spec.width, spec.channels],
            }
        ],
        "outputs": outputs,
        "parameters": {
            "temperature": contract.temperature,
            "ood_threshold": contract.ood_threshold,
        },
    }


def decode_request(
    body: bytes, header_length: str | None, contract: ModelContract, max_batch: int
) -> InferRequest:
    """Parse and validate an infer request for the input of ``contract``.

    Raises:
        ApiError: 400 for a wrong tensor name, shape, datatype or size, or malformed JSON.
    """
    header, binary = _split_body(body, header_length)
    spec, input_name = contract.image, contract.input_name
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad("invalid_inputs", f"send exactly one input tensor named {input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != input_name:
        raise _bad(
            "unknown_input",
            f"unknown input {tensor.get('name')!r}: this model takes {input_name!r}",
        )
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise _bad("invalid_datatype", f"datatype {datatype!r} is not supported: use UINT8 or FP32")
    shape = tensor.get("shape")
    expected = [spec.height, spec.width, spec.channels]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(_is_count(dim) for dim in shape)
        or shape[1:] != expected
        or not 1 <= shape[0] <= max_batch
    ):
        raise _bad(
            "invalid_shape",
            f"shape {shape} does not fit this model: send [N, {', '.join(map(str, expected))}] "
            f"with 1 <= N <= {max_batch}",
        )
    dtype = np.dtype(DATATYPES[datatype])
    count = int(np.prod(shape))
    binary_size = _parameters(tensor, "input: ").get("binary_data_size")
    if binary_size is not None:
        if (
            not _is_count(binary_size)
            or binary_size != count * dtype.itemsize
            or binary_size > len(binary)
        ):
            raise _bad(
                "invalid_binary_data",
                f"binary_data_size {binary_size!r} does not hold {count} {datatype} values",
            )
        images = np.frombuffer(binary[:binary_size], dtype=dtype.newbyteorder("<")).reshape(shape)
    else:
        images = _json_values(tensor.get("data"), count, datatype).reshape(shape)
    _check_range(images, datatype)
    return _with_request(header, images.astype(dtype, copy=False), contract)


def _json_values(data: object, count: int, datatype: str) -> np.ndarray:
    """The numbers of a JSON ``data`` list (flat or nested), as int64 or float64, checked to be
    numbers (not strings, booleans or nulls) and ``count`` of them."""
    if not isinstance(data, list):
        raise _bad("invalid_data", f"'data' must be a list of {count} numbers")
    try:
        values = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise _bad("invalid_data", f"'data' must be {count} numbers ({exc})") from None
    if values.dtype.kind not in "iuf" or values.size != count:
        raise _bad(
            "invalid_data",
            f"'data' must hold {count} {datatype} numbers; it holds {values.size} values of "
            f"type {values.dtype.kind!r}",
        )
    return values.reshape(-1)


def _check_range(images: np.ndarray, datatype: str) -> None:
    """Pixels are 0-255: UINT8 values whole and in range, FP32 values finite and in range."""
    if images.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            fine = bool(np.isfinite(images).all() and images.min() >= 0 and images.max() <= 255)
    else:
        fine = bool(images.min() >= 0 and images.max() <= 255)
    if datatype == "UINT8" and images.dtype.kind == "f":
        fine = fine and bool((images == np.round(images)).all())
    if not fine:
        raise _bad(
            "invalid_data",
            f"{datatype} pixels must be {'finite ' if datatype == 'FP32' else 'whole '}numbers "
            "from 0 to 255",
        )


def _with_request(header: dict, images: np.ndarray, contract: ModelContract) -> InferRequest:
    request_id = header.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_ID_LENGTH
    ):
        raise _bad("invalid_id", f"'id' must be a string of at most {MAX_ID_LENGTH} characters")
    return InferRequest(
        id=request_id,
        images=images,
        outputs=_requested_outputs(header, contract),
    )


def classification_count(request: InferRequest, num_classes: int) -> int | None:
    """The top-k to rank for a request: its largest ``classification`` count, capped at the
    number of classes as Triton does; None (the default) when no output asks for one."""
    counts = [wanted["classification"] for wanted in request.outputs if wanted["classification"]]
    # Triton's cap; the pipeline checks it, with every other top-k, once.
    return min(max(counts), num_classes) if counts else None


def _classification_strings(answers: Answers, k: int) -> np.ndarray:
    """Triton's classification extension: ``"score:index:label"``, best first, ``(N, k)``. An
    input the detector flags starts with ``"score:-1:unknown"`` (when the answers show
    ``unknown``), then the closest classes."""
    position = {label: index for index, label in enumerate(answers.contract.labels)}
    k = min(k, answers.contract.num_classes)  # Triton's cap; the count was checked at parsing
    rows = []
    for row, best in enumerate(answers.ranked):
        entries = [f"{e['score']:f}:{position[e['label']]}:{e['label']}" for e in best[:k]]
        if answers.shows_unknown(row):
            entries = [f"{best[0]['score']:f}:-1:{UNKNOWN_LABEL}", *entries[: k - 1]]
        rows.append(entries)
    return np.asarray(rows, dtype=object)


def _serialize_bytes(values: np.ndarray) -> bytes:
    """BYTES tensor wire format: each element as a 4-byte little-endian length, then its bytes."""
    chunks = []
    for value in values.reshape(-1):
        encoded = value.encode()
        chunks.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(chunks)


def encode_response(request: InferRequest, answers: Answers) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its extra headers (binary extension when asked for), from
    the answers ranked to at least :func:`classification_count`."""
    contract, predictions = answers.contract, answers.predictions
    outputs, blobs = [], []
    for wanted in request.outputs:
        name = wanted["name"]
        if wanted["classification"]:
            values = _classification_strings(answers, wanted["classification"])
            entry = {"name": name, "datatype": "BYTES", "shape": list(values.shape)}
            raw, listed = _serialize_bytes(values), values.reshape(-1).tolist()
        else:
            tensor = {
                PROBABILITIES: predictions.probabilities,
                OOD_SCORE: predictions.ood_scores,
                contract.cam_output_name: predictions.cams,
            }[name]
            values = np.asarray(tensor).astype("<f4")
            entry = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
            raw, listed = values.tobytes(), values.reshape(-1).tolist()
        if wanted["binary"]:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = listed
        outputs.append(entry)
    header = {
        "model_name": contract.name,
        "model_version": contract.version,
        "outputs": outputs,
        # Each image's id, as POST /feedback names it (the response-level parameters of OIP).
        "parameters": {"request_ids": list(answers.request_ids)},
    }
    if request.id is not None:
        header["id"] = request.id
    header_bytes = json.dumps(header).encode()
    if not blobs:
        return header_bytes, {"content-type": "application/json"}
    return header_bytes + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header_bytes)),
    }
