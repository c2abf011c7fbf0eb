"""Load an exported classifier (``model.onnx`` + its metadata) and refuse a malformed one.

A model comes from an artifact folder (``MODEL_PATH``, e.g. a mounted volume) or from the BentoML
model store (``MODEL_TAG``, default ``<MODEL_NAME>:latest``). Labels and the preprocessing spec
are read from the ONNX file's own ``metadata_props``: one source of truth.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.postprocessing import softmax, top_k
from service.preprocessing import ImageSpec

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_MODEL_NAME = "animals"


class ModelLoadError(Exception):
    """The model cannot be served; the message is one line naming the problem."""


def available_cpus() -> int:
    """CPUs this process may use: the cgroup CPU limit (as Kubernetes sets it) if there is one,
    else the CPUs it is allowed to run on. onnxruntime itself looks only at the host's cores."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@dataclass
class ModelSource:
    """Where the model files are, and how to name that place in messages."""

    folder: Path
    description: str


def locate_model(environ: dict | None = None) -> ModelSource:
    """Resolve ``MODEL_PATH`` or ``MODEL_TAG`` / ``MODEL_NAME`` to a folder holding model.onnx."""
    environ = os.environ if environ is None else environ
    if environ.get("MODEL_PATH"):
        folder = Path(environ["MODEL_PATH"])
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL_PATH={folder} is not a folder: mount or export a model")
        return ModelSource(folder.resolve(), f"MODEL_PATH={folder}")
    tag = environ.get("MODEL_TAG") or f"{environ.get('MODEL_NAME', DEFAULT_MODEL_NAME)}:latest"
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except BentoMLException as exc:
        raise ModelLoadError(
            f"model {tag} is not in the BentoML model store: run 'make train', or set MODEL_PATH "
            "to an artifact folder"
        ) from exc
    return ModelSource(Path(model.path), f"model {model.tag}")


@dataclass
class Classifier:
    """An ONNX image classifier with its labels and preprocessing spec, ready to run."""

    session: object  # onnxruntime.InferenceSession
    labels: list[str]
    spec: ImageSpec
    name: str
    version: str
    opset: int
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Run the model. ``images``: ``(N, H, W, C)`` raw 0-255 pixels, any numeric dtype.

        Returns:
            ``(N, K)`` float32 logits.
        """
        batch = np.asarray(images, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(N, K)`` float32 softmax probabilities."""
        return softmax(self.logits(images))

    def describe(self, probabilities: np.ndarray, k: int) -> list[dict]:
        """One prediction per row: top-1 label and score, the top ``k``, and the model."""
        predictions = []
        for best in top_k(probabilities, self.labels, k):
            predictions.append(
                {
                    "label": best[0]["label"],
                    "score": best[0]["score"],
                    "top_k": best,
                    "model": {"name": self.name, "version": self.version},
                }
            )
        return predictions


def _read_metadata(session, source: str) -> tuple[list[str], ImageSpec, dict]:
    props = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in ("labels", "image") if key not in props]
    if missing:
        raise ModelLoadError(
            f"{source}: model.onnx has no {', '.join(missing)} in its metadata: export it with "
            "'python -m training export'"
        )
    try:
        labels = json.loads(props["labels"])
        spec = ImageSpec.from_dict(json.loads(props["image"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{source}: model.onnx metadata is malformed ({exc})") from exc
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ModelLoadError(f"{source}: the labels in model.onnx are not a list of names")
    return labels, spec, props


def _check_signature(session, labels: list[str], spec: ImageSpec, source: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [tensor.name for tensor in inputs] != [INPUT_NAME]:
        raise ModelLoadError(
            f"{source}: the model's inputs are {[tensor.name for tensor in inputs]}, expected one "
            f"image tensor named {INPUT_NAME!r}"
        )
    shape = inputs[0].shape
    if len(shape) != 4 or list(shape[1:]) != list(spec.shape):
        raise ModelLoadError(
            f"{source}: the model's input {INPUT_NAME!r} has shape {shape}, not an image tensor "
            f"[N, {spec.height}, {spec.width}, {spec.channels}] as its metadata says"
        )
    if OUTPUT_NAME not in [tensor.name for tensor in outputs]:
        raise ModelLoadError(f"{source}: the model has no output named {OUTPUT_NAME!r}")
    output_shape = next(tensor.shape for tensor in outputs if tensor.name == OUTPUT_NAME)
    if len(output_shape) != 2 or output_shape[1] != len(labels):
        raise ModelLoadError(
            f"{source}: the model outputs {output_shape[-1]} scores but has {len(labels)} "
            "labels; labels and model must come from the same export"
        )


def load_classifier(source: ModelSource, threads: int = 1) -> Classifier:
    """Open ``source.folder/model.onnx`` in onnxruntime and check it against its metadata.

    Args:
        threads: onnxruntime intra-op threads; set from the CPUs per worker, since onnxruntime
            would otherwise start one thread per host core in every worker.

    Raises:
        ModelLoadError: missing or corrupt file, labels that do not match the output, or an
            input that is not an ``(N, H, W, C)`` image tensor.
    """
    import onnxruntime as ort

    path = source.folder / "model.onnx"
    if not path.is_file():
        raise ModelLoadError(f"{source.description}: {path} is missing: export the model first")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several private exception types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{source.description}: {path} is not a loadable ONNX model ({message})"
        ) from exc
    labels, spec, props = _read_metadata(session, source.description)
    _check_signature(session, labels, spec, source.description)
    return Classifier(
        session=session,
        labels=labels,
        spec=spec,
        name=props.get("model_name", path.parent.name),
        version=props.get("model_version", "unknown"),
        opset=int(props.get("opset", 0)),
        source=source.description,
    )
