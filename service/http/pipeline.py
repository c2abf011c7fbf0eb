"""The one request pipeline: images in, answers out. Every route that classifies (``/classify``,
``/classify_batch``, OIP's infer) calls :meth:`ClassificationService.classify`, which preprocesses
the images (each timed here), hands the pixels to the classifier's one door
(:meth:`~service.core.classifier.Classifier.classify`, which times its predict and postprocess
steps into :func:`observer`), counts the answers in the metrics, gives each image its request
id, and keeps what feedback and capture need (:meth:`ClassificationService.keep`).

Routes reach the service through the typed dependency :data:`Service`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import aiohttp
import anyio
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import Depends, Request, UploadFile

from service.core import explain
from service.core.classifier import PREDICT, Classifier, ModelOutputs, Observe
from service.core.postprocessing import Answers, TopKError, choose_top_k
from service.core.preprocessing import (
    ImageError,
    ImageSpec,
    inspect_image,
    load_image,
    to_model_input,
)
from service.http.capture import CapturePolicy, CaptureStore, Entry
from service.http.decoding import INLINE_MAX_DECODED_BYTES, INLINE_MAX_UPLOAD_BYTES, DecodeGate
from service.http.drift import DriftMonitor
from service.http.errors import ApiError
from service.http.metrics import Metrics, get_metrics, record_predictions
from service.http.settings import ServiceSettings
from service.http.shadow import Shadow
from service.store.log import PredictionLog

MODEL_CALL_ATTEMPTS = 3
# Work this small (one 28x28 image: about 0.1 ms to decode, 0.2 ms in onnxruntime) runs on the
# event loop: handing it to a thread costs more, and at 32 concurrent requests the threads'
# contention for the GIL tripled the p99 latency (BENCHMARKS.md).
INLINE_MAX_IMAGES = 2

# ``(N, H, W, C)`` pixels -> the model outputs of ``ModelOutputs.stacked``, from the batching
# model service.
RemoteModel = Callable[[np.ndarray], Awaitable[np.ndarray]]


def observer(metrics: Metrics) -> Observe:
    """Where the classifier's steps are timed: its predict step into the inference histogram
    (with the images per onnxruntime call), its postprocess step into the postprocess one."""

    def observe(step: str, seconds: float, images: int) -> None:
        if step == PREDICT:
            metrics.inference_seconds.observe(seconds)
            metrics.batch_size.observe(images)
        else:
            metrics.postprocess_seconds.observe(seconds)

    return observe


def run_model(classifier: Classifier, images: np.ndarray, metrics: Metrics) -> ModelOutputs:
    """The predict step in the model worker (batching on): ``(N, H, W, C)`` pixels -> logits,
    unknown-input scores and class activation maps, timed by the classifier."""
    return classifier.predict(images, observer(metrics))


class ClassificationService:
    """One API worker's classifier behind the request pipeline.

    Args:
        classifier: the model, loaded in this worker.
        settings: the service's settings (image limits, default top-k, ``unknown`` label).
        batching: the adaptive-batching decision as ``GET /model`` shows it.
        remote_model: with adaptive batching on, the model service's call; else None, and this
            worker runs onnxruntime itself.
        log: with the prediction log on, this worker's writer into it.
        capture: with ``CAPTURE`` on, the writer of the capture store.
        shadow: with ``SHADOW_MODEL`` set, the challenger that gets a share of the answered
            requests' pixels, off the request path.
        drift: with ``DRIFT_WINDOW`` > 0, this worker's window of answers that the drift checks
            test, off the request path.
    """

    def __init__(
        self,
        classifier: Classifier,
        settings: ServiceSettings,
        batching: dict,
        remote_model: RemoteModel | None = None,
        log: PredictionLog | None = None,
        capture: CaptureStore | None = None,
        shadow: Shadow | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.classifier = classifier
        self.shadow = shadow
        self.drift = drift
        self.settings = settings
        self.batching = batching
        self.remote_model = remote_model
        self.log = log
        self.capture = capture
        self.capture_policy = CapturePolicy.from_setting(settings.capture, settings.capture_margin)
        self.capture_folder = settings.capture_dir
        self.metrics = get_metrics()
        self.observe = observer(self.metrics)
        self.decodes = DecodeGate(settings.max_decodes_in_flight, settings.max_decodes_waiting)

    async def classify(
        self,
        inputs: list[UploadFile] | np.ndarray,
        top_k: int | None,
        endpoint: str,
        request_id: str,
        explain_mode: str = explain.NONE,
        classifier: Classifier | None = None,
    ) -> Answers:
        """Classify uploaded image files, or a batch of pixels ``(N, H, W, C)`` (raw 0-255).

        The classifier is read once, here: a request that starts before a new model version
        takes over (:mod:`service.http.model_swap`) finishes on the version it started with.

        Args:
            top_k: labels per answer; None for the default (capped at the number of classes).
            endpoint: the metrics' ``endpoint`` label of the route.
            request_id: the request's id; a single image's answer carries it, the images of a
                batch carry ``<id>-<position>``.
            explain_mode: ``explain.MAP`` adds each image's class activation map to its answer,
                ``explain.PNG`` also the map laid over the image as a PNG.
            classifier: the version to use (a route that already checked it); None for the one
                served now.

        Raises:
            ApiError: a top-k out of range (400), an explanation from a model without a map
                (400), an image that cannot be read (4xx), or the batching model service out of
                reach (503).
        """
        started = time.perf_counter()
        classifier = classifier or self.classifier
        try:
            k = choose_top_k(top_k, classifier.num_classes, self.settings.default_top_k)
        except TopKError as error:
            raise ApiError.from_top_k_error(error) from None
        if explain_mode:
            try:
                explain.require_map(classifier.contract)
            except explain.ExplainError as error:
                raise ApiError(400, "explain_unavailable", str(error)) from None
        sent: list[bytes] | None = None
        if isinstance(inputs, np.ndarray):
            images = inputs
        else:
            keep_bytes = (
                self.capture is not None or self.log is not None or explain_mode == explain.PNG
            )
            sent = [] if keep_bytes else None
            images = await self._preprocess(inputs, sent, classifier.spec)
        answers = await self._classify(classifier, images, k, image_ids(request_id, len(images)))
        record_predictions(answers.contract, answers.predictions, endpoint)
        self.keep(answers, sent, images, endpoint, started)
        if self.shadow is not None:
            self.shadow.offer(images, answers, classifier)
        if self.drift is not None:
            self.drift.offer(answers.predictions, classifier)
        if explain_mode:
            answers = await self._explain(answers, explain_mode, sent, images)
        return answers

    def drift_summary(self, classifier: Classifier) -> dict:
        """The drift checks as ``GET /model`` shows them."""
        if self.drift is None:
            return {"available": False, "why": "drift checks are off (DRIFT_WINDOW=0)"}
        return self.drift.describe(classifier)

    async def _explain(
        self, answers: Answers, mode: str, sent: list[bytes] | None, images: np.ndarray
    ) -> Answers:
        """The answers with their maps, and with ``explain.PNG`` each map laid over its image
        (the bytes as sent, at their own size; pixels sent as a tensor at the model's size)."""
        if mode != explain.PNG:
            return answers.explained()
        cams = answers.predictions.cams
        limits = (self.settings.max_image_pixels, self.settings.max_image_decoded_bytes)

        def draw() -> list[bytes]:
            if sent is not None:
                pairs = zip(sent, cams, strict=True)
                return [explain.overlay_png(data, cam, *limits) for data, cam in pairs]
            pairs = zip(images, cams, strict=True)
            return [explain.pixels_overlay_png(pixels, cam) for pixels, cam in pairs]

        # Each image decoded again at its own size: through the gate, like the first decode.
        try:
            return answers.explained(await self.decodes.run(draw, limits[1]))
        except ImageError as error:
            raise ApiError.from_image_error(error) from error

    async def _preprocess(
        self, uploads: list[UploadFile], sent: list[bytes] | None, spec: ImageSpec
    ) -> np.ndarray:
        """Decode and preprocess uploads: ``(N, H, W, C)`` uint8, each image timed (and their
        bytes kept in ``sent``, for capture). Each header is read first, and an image that would
        cost too much to decode is refused before any pixel is decoded. One or two small files
        are read, and their headers checked, in place; if they are tiny once decoded, they are
        decoded in place too (faster than a thread hop). Anything else is read and decoded in a
        thread of the worker's :class:`~service.http.decoding.DecodeGate`, so that neither a
        large file's bytes nor its pixels are held by more requests than the gate lets in."""
        settings = self.settings
        limits = (settings.max_image_pixels, spec, settings.max_image_decoded_bytes)
        small = len(uploads) <= INLINE_MAX_IMAGES and all(
            (upload.size or 0) <= INLINE_MAX_UPLOAD_BYTES for upload in uploads
        )
        opened: list = [None] * len(uploads)
        cost = 0

        def open_one(position: int, data: bytes) -> int:
            upload = uploads[position]
            started = time.perf_counter()
            try:
                image, image_cost = inspect_image(data, *limits)
            except ImageError as error:
                raise ApiError.from_image_error(error, upload.filename) from error
            opened[position] = (image, time.perf_counter() - started)
            if sent is not None:
                sent.append(data)
            return image_cost

        if small:
            for position, upload in enumerate(uploads):
                cost += open_one(position, await upload.read())

        def run() -> np.ndarray:
            batch = np.empty((len(uploads), *spec.shape), dtype=np.uint8)
            for position, upload in enumerate(uploads):
                if opened[position] is None:
                    upload.file.seek(0)
                    open_one(position, upload.file.read())
                image, header_seconds = opened[position]
                started = time.perf_counter()
                try:
                    batch[position] = to_model_input(load_image(image), spec)
                except ImageError as error:
                    raise ApiError.from_image_error(error, upload.filename) from error
                finally:
                    image.close()
                    opened[position] = None
                self.metrics.preprocess_seconds.observe(
                    header_seconds + time.perf_counter() - started
                )
            return batch

        if small and cost <= INLINE_MAX_DECODED_BYTES:
            return run()
        return await self.decodes.run(run, cost or limits[2])

    async def _classify(
        self, classifier: Classifier, images: np.ndarray, k: int, request_ids: tuple[str, ...]
    ) -> Answers:
        """``(N, H, W, C)`` pixels -> answers, through the classifier's one door: in this
        worker (a few images in place, more in a thread), or with batching on, the model's
        outputs from the batching model service and then the classifier's postprocess step."""
        unknown = self.settings.unknown_label
        if self.remote_model is not None:
            stacked = await self._call_remote_model(images)
            outputs = ModelOutputs.from_stacked(stacked, classifier.contract)
            return classifier.answer(outputs, k, unknown, request_ids, self.observe)
        if len(images) <= INLINE_MAX_IMAGES:
            return classifier.classify(images, k, unknown, request_ids, self.observe)
        return await anyio.to_thread.run_sync(
            classifier.classify, images, k, unknown, request_ids, self.observe
        )

    def keep(
        self,
        answers: Answers,
        sent: list[bytes] | None,
        images: np.ndarray,
        endpoint: str = "",
        started: float | None = None,
    ) -> None:
        """Hand each answer's row to the prediction log (log on) and the inputs capture keeps
        to its writer (capture on); with both off this does nothing."""
        if self.log is None and self.capture is None:
            return
        predictions = answers.predictions
        reasons = [None] * len(answers)
        if self.capture is not None:
            reasons = self.capture_policy.reasons(predictions.unknown, predictions.margins())
        if self.log is not None:
            self.log.submit(self._log_rows(answers, sent, images, endpoint, started, reasons))
        if any(reasons) and answers.predictions.cams is not None:
            answers = answers.explained()  # the store keeps each input's map with its answer
        dicts = answers.to_dicts() if any(reasons) else []
        margins = predictions.margins() if any(reasons) else []
        for position, reason in enumerate(reasons):
            if reason is None:
                continue
            answer = {**dicts[position], "reason": reason, "margin": float(margins[position])}
            if sent is not None:
                entry = Entry(answers.request_ids[position], answer, data=sent[position])
            else:
                entry = Entry(answers.request_ids[position], answer, pixels=images[position])
            self.capture.submit(entry, reason)

    def _log_rows(
        self,
        answers: Answers,
        sent: list[bytes] | None,
        images: np.ndarray,
        endpoint: str,
        started: float | None,
        reasons: list[str | None],
    ) -> list[dict]:
        """One prediction-log row per answer (:data:`service.store.schema.predictions`)."""
        now = time.time()
        latency = 0.0 if started is None else (time.perf_counter() - started) * 1000
        contract = answers.contract
        predictions = answers.predictions
        verdicts = predictions.verdicts(contract.labels)
        ood = predictions.ood_scores
        rows = []
        for position, request_id in enumerate(answers.request_ids):
            data = sent[position] if sent is not None else images[position].tobytes()
            ranked = answers.ranked[position]
            rows.append(
                {
                    "request_id": request_id,
                    "at": now,
                    "endpoint": endpoint,
                    "model_name": contract.name,
                    "model_version": contract.version,
                    "top_k": [{"label": r["label"], "score": float(r["score"])} for r in ranked],
                    "predicted": ranked[0]["label"],
                    "verdict": verdicts[position],
                    "score": float(ranked[0]["score"]),
                    "ood_score": None if ood is None else float(ood[position]),
                    "input_digest": hashlib.blake2b(data, digest_size=16).hexdigest(),
                    "input_bytes": len(data),
                    "captured": reasons[position] is not None,
                    "capture_reason": reasons[position],
                    "latency_ms": latency,
                }
            )
        return rows

    async def _call_remote_model(self, images: np.ndarray) -> np.ndarray:
        for _attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                return await self.remote_model(images)
            except aiohttp.ClientError as error:
                # A model worker restarted or a connection dropped: inference has no side
                # effects, so the call is simply sent again.
                failure = error
            except BentoMLException as error:  # e.g. the batching queue gave up on the call
                raise ApiError(
                    503, "model_unavailable", f"the model service did not answer: {error}"
                ) from error
        raise ApiError(
            503, "model_unavailable", f"the model service could not be reached: {failure}"
        )


def image_ids(request_id: str, count: int) -> tuple[str, ...]:
    """Each image's id: the request's own for one image, ``<id>-<position>`` in a batch."""
    if count == 1:
        return (request_id,)
    return tuple(f"{request_id}-{position}" for position in range(count))


def service_of(request: Request) -> ClassificationService:
    """This worker's :class:`ClassificationService`, which its start-up put on the app."""
    return request.app.state.classification_service


async def current_service(request: Request) -> ClassificationService:
    """:func:`service_of` as an ``async`` dependency, so FastAPI calls it in place instead of
    in a thread."""
    return service_of(request)


# The routes' typed dependency on the service.
Service = Annotated[ClassificationService, Depends(current_service)]
