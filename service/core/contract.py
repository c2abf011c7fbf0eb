"""The model contract: what an exported classifier promises whoever serves it, defined once.

The training job builds one :class:`ModelContract` per run and writes it into ``model.onnx``
(``metadata_props``), ``metadata.json``, ``labels.json`` and the model store; the service, the
CLI and the tests read it back from there. Every key of those places is spelled in this module
alone, so a new field (a calibration temperature, a detector's statistics) has one home.
Only the standard library and the preprocessing spec are used: the service never needs
TensorFlow or the ``onnx`` package to read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from service.core.preprocessing import ImageSpec

# The graph's one input, float32 (N, H, W, C) of raw 0-255 pixels, and its one output, float32
# (N, K) logits (softmax is the server's job).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The class activation map of the top class, float32 (N, h, w) scaled to 0-1, at the resolution
# of the last feature map (training/model/cam.py): where the model found its answer.
CAM_OUTPUT_NAME = "cam"
INPUT_RANGE = "0-255"
PRODUCER = "image-classifier-stack"
# How each field is named in ONNX metadata_props; the JSON-encoded ones are marked.
_NAME, _VERSION = "model_name", "model_version"
_LABELS, _IMAGE, _METRICS = "labels", "image", "metrics"  # JSON
_OPSET, _INPUT, _OUTPUT, _RANGE = "opset", "input_name", "output_name", "input_range"
_SOURCE, _FINGERPRINT = "data_source", "data_fingerprint"
_PRECISION = "precision"
_TEMPERATURE, _OOD_OUTPUT, _OOD_THRESHOLD = "temperature", "ood_output_name", "ood_threshold"
_CAM_OUTPUT, _CAM_LEFT_OUT = "cam_output_name", "cam_left_out"
_CAM_SHAPE = "cam_shape"  # JSON
_DRIFT_REFERENCE = "drift_reference"
REQUIRED_PROPS = (_LABELS, _IMAGE)


class ContractError(ValueError):
    """A model's contract is missing or malformed; the message is one line naming the problem."""


@dataclass(frozen=True)
class ModelContract:
    """Labels, input, tensor names, identity and training figures of one exported model.

    ``labels[i]`` names output position ``i``; ``image`` is what preprocessing must produce.
    """

    name: str
    version: str
    labels: tuple[str, ...]
    image: ImageSpec
    opset: int = 0
    metrics: Mapping = field(default_factory=dict)  # test_accuracy, balanced_accuracy, ...
    data_source: str = ""
    data_fingerprint: str = ""
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_range: str = INPUT_RANGE
    precision: str = "float32"  # of the weights and activations: float32, or int8 (quantized)
    # Calibration: scores are softmax(logits / temperature), fitted on the validation split.
    temperature: float = 1.0
    # The unknown-input detector: a second output, (N,) float32, and the score above which an
    # input is unlike the training images. Empty / None for a model without one.
    ood_output_name: str = ""
    ood_threshold: float | None = None
    # The class activation map: a third output, (N, h, w) float32 in [0, 1], of shape
    # ``cam_shape`` = (h, w). Empty for a model without one, with ``cam_left_out`` saying why
    # (a head that is not global average pooling + one linear layer).
    cam_output_name: str = ""
    cam_shape: tuple[int, ...] = ()
    cam_left_out: str = ""
    # The drift reference shipped beside the model (service/core/drift.py): the file name in
    # the model's folder, empty for a model trained before it (its drift checks are off).
    drift_reference: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "cam_shape", tuple(int(size) for size in self.cam_shape))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def has_detector(self) -> bool:
        return bool(self.ood_output_name) and self.ood_threshold is not None

    @property
    def has_cam(self) -> bool:
        return bool(self.cam_output_name) and len(self.cam_shape) == 2

    def cam_summary(self) -> dict:
        """The map as clients see it (``GET /model``, ``metadata.json``): its output and shape,
        or why the model has none."""
        if self.has_cam:
            return {"output": self.cam_output_name, "shape": list(self.cam_shape)}
        return {"output": None, "shape": None, "left_out": self.cam_left_out or None}

    @property
    def tag(self) -> str:
        """The model-store tag, ``name:version``."""
        return f"{self.name}:{self.version}"

    # --- ONNX metadata_props ------------------------------------------------------------------

    def to_onnx_props(self) -> dict[str, str]:
        return {
            _LABELS: json.dumps(list(self.labels)),
            _IMAGE: json.dumps(self.image.to_dict()),
            _INPUT: self.input_name,
            _OUTPUT: self.output_name,
            _RANGE: self.input_range,
            _OPSET: str(self.opset),
            _NAME: self.name,
            _VERSION: self.version,
            _METRICS: json.dumps(dict(self.metrics)),
            _FINGERPRINT: self.data_fingerprint,
            _SOURCE: self.data_source,
            _PRECISION: self.precision,
            _TEMPERATURE: repr(float(self.temperature)),
            _OOD_OUTPUT: self.ood_output_name,
            _OOD_THRESHOLD: "" if self.ood_threshold is None else repr(float(self.ood_threshold)),
            _CAM_OUTPUT: self.cam_output_name,
            _CAM_SHAPE: json.dumps(list(self.cam_shape)),
            _CAM_LEFT_OUT: self.cam_left_out,
            _DRIFT_REFERENCE: self.drift_reference,
        }

    def write_to_onnx(self, proto) -> None:
        """Store the contract in an ONNX ``ModelProto`` (its ``metadata_props``), in place."""
        del proto.metadata_props[:]
        for key, value in self.to_onnx_props().items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = PRODUCER
        proto.doc_string = f"{self.name} {self.version}: image classifier ({self.output_name})"

    @classmethod
    def from_onnx_props(cls, props: Mapping[str, str], where: str = "model.onnx") -> ModelContract:
        """Read a contract back from ``metadata_props`` as a key -> value mapping.

        Raises:
            ContractError: a required key is missing, or a value is malformed.
        """
        missing = [key for key in REQUIRED_PROPS if key not in props]
        if missing:
            raise ContractError(
                f"{where} has no {', '.join(missing)} in its metadata: export it with "
                "'python -m training export'"
            )
        try:
            labels = json.loads(props[_LABELS])
            image = ImageSpec.from_dict(json.loads(props[_IMAGE]))
            metrics = json.loads(props.get(_METRICS) or "{}")
            opset = int(props.get(_OPSET) or 0)
            temperature = float(props.get(_TEMPERATURE) or 1.0)
            threshold = props.get(_OOD_THRESHOLD) or None
            threshold = None if threshold is None else float(threshold)
            cam_shape = tuple(int(size) for size in json.loads(props.get(_CAM_SHAPE) or "[]"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ContractError(f"{where} metadata is malformed ({exc})") from exc
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ContractError(f"the labels in {where} are not a list of names")
        if not temperature > 0:
            raise ContractError(f"the temperature in {where} is {temperature}, not positive")
        return cls(
            name=props.get(_NAME, "model"),
            version=props.get(_VERSION, "unknown"),
            labels=tuple(labels),
            image=image,
            opset=opset,
            metrics=metrics if isinstance(metrics, dict) else {},
            data_source=props.get(_SOURCE, ""),
            data_fingerprint=props.get(_FINGERPRINT, ""),
            input_name=props.get(_INPUT, INPUT_NAME),
            output_name=props.get(_OUTPUT, OUTPUT_NAME),
            input_range=props.get(_RANGE, INPUT_RANGE),
            precision=props.get(_PRECISION) or "float32",
            temperature=temperature,
            ood_output_name=props.get(_OOD_OUTPUT, ""),
            ood_threshold=threshold,
            cam_output_name=props.get(_CAM_OUTPUT, ""),
            cam_shape=cam_shape,
            cam_left_out=props.get(_CAM_LEFT_OUT, ""),
            drift_reference=props.get(_DRIFT_REFERENCE, ""),
        )

    @classmethod
    def read_from_onnx(cls, proto, where: str = "model.onnx") -> ModelContract:
        """The contract stored in an ONNX ``ModelProto``."""
        return cls.from_onnx_props({e.key: e.value for e in proto.metadata_props}, where)

    @classmethod
    def read_from_session(cls, session, where: str = "model.onnx") -> ModelContract:
        """The contract of the model an ``onnxruntime.InferenceSession`` has open."""
        return cls.from_onnx_props(dict(session.get_modelmeta().custom_metadata_map), where)

    # --- metadata.json, labels.json, the model store and GET /model ---------------------------

    def to_metadata(self) -> dict:
        """The contract's part of ``metadata.json`` (the run adds its own sections)."""
        return {
            "name": self.name,
            "version": self.version,
            _LABELS: list(self.labels),
            _IMAGE: self.image.to_dict(),
            "input": {
                "name": self.input_name,
                "shape": [None, *self.image.shape],
                "dtype": "float32",
                "range": f"raw {self.input_range} pixels",
            },
            "normalization": "in-graph: Rescaling(1/255) is the model's first layer",
            "output": {
                "name": self.output_name,
                "shape": [None, self.num_classes],
                "dtype": "float32",
                "postprocess": "softmax(logits / temperature), then argmax / top-k",
            },
            "data": {"source": self.data_source, "fingerprint": self.data_fingerprint},
            _METRICS: dict(self.metrics),
            _OPSET: self.opset,
            _PRECISION: self.precision,
            "calibration": {_TEMPERATURE: self.temperature},
            "unknown_inputs": {"output": self.ood_output_name, "threshold": self.ood_threshold},
            "explanation": {
                **self.cam_summary(),
                "method": "class activation map of the top class (Zhou et al., 2016): "
                "ReLU(feature map x head weights), scaled to 0-1 per image",
            },
            "drift": {"reference": self.drift_reference or None},
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> ModelContract:
        """The inverse of :meth:`to_metadata`, as read back from ``metadata.json``."""
        data = metadata.get("data", {})
        explanation = metadata.get("explanation", {})
        return cls(
            name=metadata["name"],
            version=metadata["version"],
            labels=tuple(metadata[_LABELS]),
            image=ImageSpec.from_dict(metadata[_IMAGE]),
            opset=int(metadata.get(_OPSET) or 0),
            metrics=dict(metadata.get(_METRICS) or {}),
            data_source=data.get("source", ""),
            data_fingerprint=data.get("fingerprint", ""),
            input_name=metadata.get("input", {}).get("name", INPUT_NAME),
            output_name=metadata.get("output", {}).get("name", OUTPUT_NAME),
            precision=metadata.get(_PRECISION) or "float32",
            temperature=float(metadata.get("calibration", {}).get(_TEMPERATURE, 1.0)),
            ood_output_name=metadata.get("unknown_inputs", {}).get("output", ""),
            ood_threshold=metadata.get("unknown_inputs", {}).get("threshold"),
            cam_output_name=explanation.get("output") or "",
            cam_shape=tuple(explanation.get("shape") or ()),
            cam_left_out=explanation.get("left_out") or "",
            drift_reference=(metadata.get("drift") or {}).get("reference") or "",
        )

    def to_labels_file(self) -> dict:
        """``labels.json``: the class-label file, index = output position."""
        return {_LABELS: list(self.labels)}

    def summary_for_clients(self) -> dict:
        """What a client needs to call the model (``GET /model``): name, version, labels, input
        spec, precision, temperature, the unknown-input threshold and the map's shape."""
        return {
            "name": self.name,
            "version": self.version,
            _LABELS: list(self.labels),
            _IMAGE: self.image.to_dict(),
            _PRECISION: self.precision,
            _TEMPERATURE: self.temperature,
            _OOD_THRESHOLD: self.ood_threshold,
            "cam": self.cam_summary(),
            _DRIFT_REFERENCE: self.drift_reference or None,
        }

    def to_store_metadata(self) -> dict:
        """Metadata of the model in the BentoML model store (shown by ``bentoml models get``)."""
        return {
            _LABELS: list(self.labels),
            _IMAGE: self.image.to_dict(),
            "test_accuracy": self.metrics.get("test_accuracy"),
            _FINGERPRINT: self.data_fingerprint,
            _OPSET: self.opset,
            _PRECISION: self.precision,
            _TEMPERATURE: self.temperature,
            _OOD_THRESHOLD: self.ood_threshold,
            _CAM_SHAPE: list(self.cam_shape),
        }
