"""The prediction service: BentoML 1.4 + onnxruntime, served by
``bentoml serve service.service:ImageClassifier``.

- ``ImageClassifier`` (``WORKERS`` processes) takes HTTP requests: it decodes and preprocesses
  images with the training job's own function, runs the model, and turns scores into labels.
- With ``BATCHING=1``, ``OnnxModel`` (``MODEL_WORKERS`` processes) runs onnxruntime instead, behind
  BentoML's adaptive batching, so concurrent requests share one onnxruntime call. Off by default:
  measured, the extra process hop costs more than batching saves for this model (BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import logging
import sys
import time

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, UploadFile

from service import batching, oip_routes, routes
from service.classifier import (
    Classifier,
    ModelLoadError,
    ModelOutputs,
    Predictions,
    load_classifier,
    locate_model,
)
from service.connections import ConnectionRecycleMiddleware
from service.errors import (
    ApiError,
    BodySizeLimitMiddleware,
    JsonErrorMiddleware,
    install_error_handlers,
)
from service.metrics import get_metrics, record_inference, record_model_loaded, record_predictions
from service.preprocessing import ImageError
from service.settings import ServiceSettings

log = logging.getLogger("service")

# Read once at import: BentoML's decorators below need the worker counts and batching bounds.
SETTINGS = ServiceSettings.from_env()
# BATCHING=auto measures the model here, in the first process to import this module, and passes
# the decision on to the workers it starts (service/batching.py).
BATCHING = batching.resolve(
    SETTINGS.batching,
    lambda: load_classifier(
        locate_model(SETTINGS), threads=SETTINGS.onnx_threads(SETTINGS.api_workers)
    ),
)
MODEL_CALL_ATTEMPTS = 3
# Work this small (one 28x28 image: about 0.1 ms to decode, 0.2 ms in onnxruntime) runs on the
# event loop: handing it to a thread costs more, and at 32 concurrent requests the threads'
# contention for the GIL tripled the p99 latency (BENCHMARKS.md).
INLINE_MAX_IMAGES = 2
INLINE_MAX_BYTES = 256 * 1024


def freeze_startup_objects() -> None:
    """Move everything built at start-up (the imported libraries, the model) out of the garbage
    collector's reach. A full collection otherwise scans those 100,000+ objects again and again,
    stopping the worker for about 75 ms each time: the periodic stall behind the p99 latency
    (BENCHMARKS.md). Request objects are still collected as before."""
    gc.collect()
    gc.freeze()


def predict_observed(classifier: Classifier, images: np.ndarray) -> ModelOutputs:
    """The predict step, timed: ``(N, H, W, C)`` pixels -> logits and unknown-input scores."""
    started = time.perf_counter()
    outputs = classifier.predict(images)
    record_inference(time.perf_counter() - started, len(images))
    return outputs


# Every path excluded from OpenTelemetry's middleware (the pattern matches any URL).
UNTRACED = {"excluded_urls": [".*"]}


@bentoml.service(
    name="onnx_model",
    workers=SETTINGS.model_workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={} if SETTINGS.tracing else UNTRACED,
    # Callers keep their pooled connection: BentoML 1.4.40 otherwise replaces it every 100 calls
    # and closes the old one under calls still in flight ("Connector is closed" under load).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 365 * 24 * 3600.0},
)
class OnnxModel:
    """onnxruntime over batches of preprocessed images."""

    def __init__(self) -> None:
        started = time.perf_counter()
        threads = SETTINGS.onnx_threads(SETTINGS.model_workers)
        self.classifier = load_classifier(locate_model(SETTINGS), threads=threads)
        record_model_loaded(self.classifier.contract, time.perf_counter() - started)
        log.info("onnxruntime model %s loaded, %d threads", self.classifier.source, threads)
        freeze_startup_objects()

    @bentoml.api(
        batchable=BATCHING,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.batch_max_latency_ms,
    )
    def logits(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` raw pixels -> ``(N, K)`` float32 logits, with the unknown-input
        score as one more column when the model has a detector (``ModelOutputs.stacked``)."""
        return predict_observed(self.classifier, images).stacked()


api = FastAPI(
    title="Image classifier",
    description="Classify images with an ONNX model; Open Inference Protocol under /v2.",
)


install_error_handlers(api)
api.include_router(routes.router)
api.include_router(oip_routes.router)


def _is_small(uploads: list[UploadFile]) -> bool:
    return (
        len(uploads) <= INLINE_MAX_IMAGES
        and sum(upload.size or INLINE_MAX_BYTES for upload in uploads) < INLINE_MAX_BYTES
    )


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.api_workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={} if SETTINGS.tracing else UNTRACED,
)
@bentoml.asgi_app(api, path="/")
class ImageClassifier:
    """The HTTP API: /classify, /classify_batch and the Open Inference Protocol under /v2."""

    if BATCHING:
        # Inference goes to the OnnxModel service, which gathers concurrent calls into batches.
        onnx_model = bentoml.depends(OnnxModel)

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the serving process, before any worker starts: a model that cannot be served
        stops ``bentoml serve`` with one line naming the problem (exit status 2), instead of
        workers failing and restarting forever."""
        try:
            load_classifier(locate_model(SETTINGS), threads=1)
        except ModelLoadError as error:
            print(f"error: cannot serve: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def __init__(self) -> None:
        # The contract (labels, preprocessing spec, name, version) comes from the model file
        # itself. Without batching this worker also runs onnxruntime, with its share of the CPUs.
        started = time.perf_counter()
        threads = 1 if BATCHING else SETTINGS.onnx_threads(SETTINGS.api_workers)
        self.classifier: Classifier = load_classifier(locate_model(SETTINGS), threads=threads)
        self.settings = SETTINGS
        self.batching = batching.describe(SETTINGS.batching, BATCHING)
        self.metrics = get_metrics()
        record_model_loaded(self.classifier.contract, time.perf_counter() - started)
        # The Open Inference Protocol routes (service/oip_routes.py) find this worker's service
        # on the app.
        api.state.served = self
        freeze_startup_objects()

    # --- the three steps: preprocess, predict, postprocess -------------------------------------

    async def preprocess(self, uploads: list[UploadFile]) -> np.ndarray:
        """Decode and preprocess uploads: ``(N, H, W, C)`` uint8, each image timed. Large work
        goes to a thread so the event loop keeps serving; a small image is done in place, faster
        than a thread hop."""

        def run() -> np.ndarray:
            batch = np.empty((len(uploads), *self.classifier.spec.shape), dtype=np.uint8)
            for position, upload in enumerate(uploads):
                started = time.perf_counter()
                try:
                    batch[position] = self.classifier.preprocess(
                        upload.file.read(), SETTINGS.max_image_pixels
                    )
                except ImageError as error:
                    raise ApiError.from_image_error(error, upload.filename) from error
                self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
            return batch

        if _is_small(uploads):
            return run()
        return await anyio.to_thread.run_sync(run)

    async def predict(self, images: np.ndarray) -> ModelOutputs:
        """``(N, H, W, C)`` pixels -> logits and unknown-input scores: in this worker, or
        through the batching model service when batching is on."""
        if BATCHING:
            stacked = await self._logits_from_model_service(images)
            return ModelOutputs.from_stacked(stacked, self.classifier.contract)
        if len(images) <= INLINE_MAX_IMAGES:
            return predict_observed(self.classifier, images)
        return await anyio.to_thread.run_sync(predict_observed, self.classifier, images)

    def postprocess(self, outputs: ModelOutputs, endpoint: str) -> Predictions:
        """Model outputs -> calibrated probabilities and verdicts, timed and counted in the
        metrics under ``endpoint``."""
        started = time.perf_counter()
        predictions = self.classifier.postprocess(outputs)
        self.metrics.postprocess_seconds.observe(time.perf_counter() - started)
        record_predictions(self.classifier.contract, predictions, endpoint)
        return predictions

    async def infer(self, images: np.ndarray, endpoint: str) -> Predictions:
        """Predict, then postprocess: the predictions of preprocessed images."""
        return self.postprocess(await self.predict(images), endpoint)

    async def _logits_from_model_service(self, images: np.ndarray) -> np.ndarray:
        for _attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                return await self.onnx_model.to_async.logits(images)
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


# Outermost first: connections are recycled, every error body gets the JSON shape, oversized
# bodies are cut off early.
ImageClassifier.add_asgi_middleware(
    ConnectionRecycleMiddleware, max_requests=SETTINGS.max_requests_per_connection
)
ImageClassifier.add_asgi_middleware(JsonErrorMiddleware)
ImageClassifier.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=SETTINGS.max_request_bytes)
