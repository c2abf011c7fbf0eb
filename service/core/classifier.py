"""The loaded classifier: ``model.onnx`` open in onnxruntime with its contract, refused when it
cannot be served, and one door to it: :meth:`Classifier.classify`, pixels in, answers out, its
predict and postprocess steps each timed once, by it (KServe's ``Model.__call__`` shape).

A model comes from an artifact folder (e.g. a mounted volume); the BentoML model store is looked
up by :mod:`service.registry`. Labels and the preprocessing spec come from the ONNX file's own
contract (:mod:`service.core.contract`): one source of truth.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.contract import ContractError, ModelContract
from service.core.drift import DriftReference, load_reference
from service.core.postprocessing import Answers, calibrated_predictions
from service.core.preprocessing import DEFAULT_MAX_PIXELS, ImageSpec, preprocess_bytes

# The steps a classification is timed by: ``observe(step, seconds, images)``.
PREDICT = "predict"
POSTPROCESS = "postprocess"
Observe = Callable[[str, float, int], None]


class ModelLoadError(Exception):
    """The model cannot be served; the message is one line naming the problem."""


@dataclass
class ModelSource:
    """Where the model files are, and how to name that place in messages."""

    folder: Path
    description: str


def model_in_folder(folder: Path, description: str) -> ModelSource:
    """An artifact folder holding ``model.onnx``, named in messages as ``description``."""
    try:
        if not folder.is_dir():
            raise ModelLoadError(f"{description} is not a folder: mount or export a model")
        return ModelSource(folder.resolve(), description)
    except OSError as error:  # e.g. a folder this user may not read
        raise ModelLoadError(f"{description}: {folder} cannot be read ({error.strerror})") from None


@dataclass
class ModelOutputs:
    """What the model gives for N images."""

    logits: np.ndarray  # (N, K) float32
    ood_scores: np.ndarray | None = None  # (N,) float32; None for a model without a detector
    cams: np.ndarray | None = None  # (N, h, w) float32 in [0, 1]; None for a model without one

    def stacked(self) -> np.ndarray:
        """One ``(N, K[+1][+h*w])`` array (the score, then the flattened map, as the last
        columns), to send between processes."""
        columns = [self.logits]
        if self.ood_scores is not None:
            columns.append(self.ood_scores[:, np.newaxis])
        if self.cams is not None:
            columns.append(self.cams.reshape(len(self.cams), -1))
        return columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)

    @classmethod
    def from_stacked(cls, array: np.ndarray, contract: ModelContract) -> ModelOutputs:
        classes = contract.num_classes
        logits, rest = array[:, :classes], array[:, classes:]
        ood_scores = cams = None
        if contract.has_detector:
            ood_scores, rest = rest[:, 0], rest[:, 1:]
        if contract.has_cam:
            cams = rest.reshape(len(array), *contract.cam_shape)
        return cls(logits, ood_scores, cams)


@dataclass
class Classifier:
    """An ONNX image classifier with its contract, ready to run."""

    session: object  # onnxruntime.InferenceSession
    contract: ModelContract
    source: str
    folder: Path | None = None  # the artifact folder it was loaded from (resolved)
    # What the drift checks compare with (service/core/drift.py), or None and why not.
    drift: DriftReference | None = None
    drift_unavailable: str = ""

    @property
    def labels(self) -> list[str]:
        return list(self.contract.labels)

    @property
    def spec(self) -> ImageSpec:
        return self.contract.image

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def version(self) -> str:
        return self.contract.version

    @property
    def num_classes(self) -> int:
        return self.contract.num_classes

    def preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Encoded image bytes -> one model input, ``(H, W, C)`` uint8, at this model's spec
        (the training job's own preprocessing). Raises
        :class:`service.core.preprocessing.ImageError`."""
        return preprocess_bytes(data, self.spec, max_pixels)

    @property
    def output_names(self) -> list[str]:
        names = [self.contract.output_name]
        if self.contract.has_detector:
            names.append(self.contract.ood_output_name)
        if self.contract.has_cam:
            # onnxruntime computes it on every call anyway (it runs the whole graph); fetching
            # it costs a copy of h*w numbers per image.
            names.append(self.contract.cam_output_name)
        return names

    def classify(
        self,
        pixels: np.ndarray,
        k: int,
        unknown_label: bool = True,
        request_ids: tuple[str, ...] = (),
        observe: Observe | None = None,
    ) -> Answers:
        """``(N, H, W, C)`` preprocessed pixels -> the answers: :meth:`predict`, then
        :meth:`answer`, each step timed into ``observe`` when one is given."""
        return self.answer(self.predict(pixels, observe), k, unknown_label, request_ids, observe)

    def predict(self, images: np.ndarray, observe: Observe | None = None) -> ModelOutputs:
        """Run the model. ``images``: ``(N, H, W, C)`` raw 0-255 pixels, any numeric dtype.

        Returns:
            ``(N, K)`` float32 logits, the ``(N,)`` unknown-input scores if the model has a
            detector, and the ``(N, h, w)`` class activation maps if it has them.
        """
        started = time.perf_counter()
        batch = np.asarray(images, dtype=np.float32)
        contract = self.contract
        outputs = dict(
            zip(
                self.output_names,
                self.session.run(self.output_names, {contract.input_name: batch}),
                strict=True,
            )
        )
        result = ModelOutputs(
            outputs[contract.output_name],
            outputs.get(contract.ood_output_name),
            outputs.get(contract.cam_output_name),
        )
        if observe is not None:
            observe(PREDICT, time.perf_counter() - started, len(batch))
        return result

    def answer(
        self,
        outputs: ModelOutputs,
        k: int,
        unknown_label: bool = True,
        request_ids: tuple[str, ...] = (),
        observe: Observe | None = None,
    ) -> Answers:
        """The postprocess step: calibrated probabilities (``softmax(logits / temperature)``),
        the verdicts and the maps, ranked to the top ``k`` and shaped as answers. ``k`` is the
        request's, already checked (:func:`service.core.postprocessing.choose_top_k`)."""
        started = time.perf_counter()
        contract = self.contract
        predictions = calibrated_predictions(
            outputs.logits, outputs.ood_scores, contract, outputs.cams
        )
        answers = Answers.rank(predictions, contract, k, unknown_label, request_ids)
        if observe is not None:
            observe(POSTPROCESS, time.perf_counter() - started, len(answers))
        return answers


def _check_signature(session, contract: ModelContract, source: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    input_name, output_name, spec = contract.input_name, contract.output_name, contract.image
    if [tensor.name for tensor in inputs] != [input_name]:
        raise ModelLoadError(
            f"{source}: the model's inputs are {[tensor.name for tensor in inputs]}, expected one "
            f"image tensor named {input_name!r}"
        )
    shape = inputs[0].shape
    if len(shape) != 4 or list(shape[1:]) != list(spec.shape):
        raise ModelLoadError(
            f"{source}: the model's input {input_name!r} has shape {shape}, not an image tensor "
            f"[N, {spec.height}, {spec.width}, {spec.channels}] as its metadata says"
        )
    if output_name not in [tensor.name for tensor in outputs]:
        raise ModelLoadError(f"{source}: the model has no output named {output_name!r}")
    if contract.has_detector and contract.ood_output_name not in [t.name for t in outputs]:
        raise ModelLoadError(
            f"{source}: the model's metadata names an unknown-input output "
            f"{contract.ood_output_name!r} that the graph lacks; export it again"
        )
    if contract.has_cam:
        cam = next((tensor for tensor in outputs if tensor.name == contract.cam_output_name), None)
        if cam is None or list(cam.shape[1:]) != list(contract.cam_shape):
            raise ModelLoadError(
                f"{source}: the model's metadata names a class activation map output "
                f"{contract.cam_output_name!r} of shape {list(contract.cam_shape)} that the graph "
                "lacks; export it again"
            )
    output_shape = next(tensor.shape for tensor in outputs if tensor.name == output_name)
    if len(output_shape) != 2 or output_shape[1] != contract.num_classes:
        raise ModelLoadError(
            f"{source}: the model outputs {output_shape[-1]} scores but has "
            f"{contract.num_classes} labels; labels and model must come from the same export"
        )


def load_classifier(source: ModelSource, threads: int = 1) -> Classifier:
    """Open ``source.folder/model.onnx`` in onnxruntime and check it against its contract.

    Args:
        threads: onnxruntime intra-op threads; set from the CPUs per worker, since onnxruntime
            would otherwise start one thread per host core in every worker.

    Raises:
        ModelLoadError: missing or corrupt file, labels that do not match the output, or an
            input that is not an ``(N, H, W, C)`` image tensor.
    """
    path = source.folder / "model.onnx"
    try:
        present = path.is_file()
    except OSError as error:  # e.g. a folder this user may not read
        raise ModelLoadError(
            f"{source.description}: {path} cannot be read ({error.strerror}): give this user "
            "read access to the model folder"
        ) from None
    if not present:
        raise ModelLoadError(f"{source.description}: {path} is missing: export the model first")
    try:
        session = open_session(str(path), threads)
    except Exception as exc:  # onnxruntime raises several private exception types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{source.description}: {path} is not a loadable ONNX model ({message})"
        ) from exc
    try:
        contract = ModelContract.read_from_session(session, "model.onnx")
    except ContractError as error:
        raise ModelLoadError(f"{source.description}: {error}") from error
    _check_signature(session, contract, source.description)
    # A model without its reference still serves; its drift metrics say "not available".
    drift, unavailable = load_reference(source.folder, contract.drift_reference, features=False)
    return Classifier(
        session=session,
        contract=contract,
        source=source.description,
        folder=source.folder,
        drift=drift,
        drift_unavailable=unavailable,
    )


def smoke_test(classifier: Classifier) -> None:
    """One inference on a blank image, checked: the outputs the contract names, one row per
    image, each the width it says, and finite. What a model must pass before it takes over
    from the one being served (a file can load and still fail on its first input).

    Raises:
        ModelLoadError: the inference fails, or its outputs are not what the contract says.
    """
    contract = classifier.contract
    try:
        outputs = classifier.predict(np.zeros((1, *classifier.spec.shape), dtype=np.uint8))
    except Exception as error:  # onnxruntime raises several private exception types
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"{classifier.source}: the first inference failed ({message})"
        ) from None
    checks = [("logits", outputs.logits, (1, contract.num_classes))]
    if contract.has_detector:
        checks.append(("unknown-input score", outputs.ood_scores, (1,)))
    for what, array, shape in checks:
        if array is None or tuple(array.shape) != shape or not np.all(np.isfinite(array)):
            got = "nothing" if array is None else f"shape {tuple(array.shape)}"
            raise ModelLoadError(
                f"{classifier.source}: the first inference gave {got} for the {what} (expected "
                f"shape {shape}, finite)"
            )


def open_session(model: str | bytes, threads: int = 1):
    """An onnxruntime CPU session of ``model`` (a path, or serialized ONNX bytes), quiet, with
    ``threads`` intra-op threads and one inter-op thread: the one way this project opens a
    model, so that the export's checks run it exactly as the service does.

    Args:
        threads: intra-op threads; set from the CPUs per process, since onnxruntime would
            otherwise start one thread per host core in every process.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


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
