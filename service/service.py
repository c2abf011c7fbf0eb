"""The prediction service: BentoML 1.4 + onnxruntime, served by
``bentoml serve service.service:ImageClassifier``.

- ``ImageClassifier`` (``WORKERS`` processes) takes HTTP requests: it decodes and preprocesses
  images with the training job's own function, runs the model, and turns scores into labels.
- With ``BATCHING=1``, ``OnnxModel`` (``MODEL_WORKERS`` processes) runs onnxruntime instead, behind
  BentoML's adaptive batching, so concurrent requests share one onnxruntime call. Off by default:
  measured, the extra process hop costs more than batching saves for this model (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import oip
from service.errors import ApiError, BodySizeLimitMiddleware, JsonErrorMiddleware
from service.metrics import (
    get_metrics,
    record_model_loaded,
    record_probabilities,
    run_observed,
)
from service.model import (
    Classifier,
    ModelLoadError,
    available_cpus,
    load_classifier,
    locate_model,
)
from service.postprocessing import softmax
from service.preprocessing import ImageError, preprocess_bytes
from service.settings import ServiceSettings

log = logging.getLogger("service")

# Read once at import: BentoML's decorators below need the worker counts and batching bounds.
SETTINGS = ServiceSettings.from_env()
MODEL_CALL_ATTEMPTS = 3
# Work this small (one 28x28 image: about 0.1 ms to decode, 0.2 ms in onnxruntime) runs on the
# event loop: handing it to a thread costs more, and at 32 concurrent requests the threads'
# contention for the GIL tripled the p99 latency (BENCHMARKS.md).
INLINE_MAX_IMAGES = 2
INLINE_MAX_BYTES = 256 * 1024


@bentoml.service(
    name="onnx_model",
    workers=SETTINGS.model_workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": SETTINGS.access_log}},
    # Callers keep their pooled connection: BentoML 1.4.40 otherwise replaces it every 100 calls
    # and closes the old one under calls still in flight ("Connector is closed" under load).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 365 * 24 * 3600.0},
)
class OnnxModel:
    """onnxruntime over batches of preprocessed images."""

    def __init__(self) -> None:
        started = time.perf_counter()
        threads = max(1, available_cpus() // SETTINGS.model_workers)
        self.classifier = load_classifier(locate_model(), threads=threads)
        record_model_loaded(self.classifier, time.perf_counter() - started)
        log.info("onnxruntime model %s loaded, %d threads", self.classifier.source, threads)

    @bentoml.api(
        batchable=SETTINGS.batching,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.batch_max_latency_ms,
    )
    def logits(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` raw pixels -> ``(N, K)`` float32 logits."""
        return run_observed(self.classifier, images)


api = FastAPI(
    title="Image classifier",
    description="Classify images with an ONNX model; Open Inference Protocol under /v2.",
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    first = problems[0] if problems else {}
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    code = "missing_field" if first.get("type") == "missing" else "invalid_field"
    detail = f"{field}: {first.get('msg', 'invalid')}"
    if code == "missing_field":
        detail += "; send multipart/form-data with the image file(s) in the field named there"
    return JSONResponse({"error": code, "detail": detail}, status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return JSONResponse({"error": code, "detail": str(error.detail)}, status_code=error.status_code)


def _is_small(uploads: list[UploadFile]) -> bool:
    return (
        len(uploads) <= INLINE_MAX_IMAGES
        and sum(upload.size or INLINE_MAX_BYTES for upload in uploads) < INLINE_MAX_BYTES
    )


@functools.cache
def _page_html() -> str:
    return (Path(__file__).parent / "static" / "index.html").read_text()


def _bentoml_openapi_page() -> Path:
    import _bentoml_impl.server

    return Path(_bentoml_impl.server.__file__).parent / "main-openapi.html"


def api_worker_count() -> int:
    return SETTINGS.workers if SETTINGS.workers > 0 else available_cpus()


def _parse_top_k(value: int | None, num_classes: int) -> int:
    k = SETTINGS.default_top_k if value is None else value
    if not 1 <= k <= num_classes:
        raise ApiError(400, "top_k_out_of_range", f"top_k must be between 1 and {num_classes}")
    return min(k, num_classes)


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.api_workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(api, path="/")
class ImageClassifier:
    """The HTTP API: /classify, /classify_batch and the Open Inference Protocol under /v2."""

    if SETTINGS.batching:
        # Inference goes to the OnnxModel service, which gathers concurrent calls into batches.
        onnx_model = bentoml.depends(OnnxModel)

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the serving process, before any worker starts: a model that cannot be served
        stops ``bentoml serve`` with one line naming the problem (exit status 2), instead of
        workers failing and restarting forever."""
        try:
            load_classifier(locate_model(), threads=1)
        except ModelLoadError as error:
            print(f"error: cannot serve: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def __init__(self) -> None:
        # Labels, preprocessing spec, name and version come from the model file itself. Without
        # batching this worker also runs onnxruntime, with its share of the CPUs.
        started = time.perf_counter()
        threads = 1 if SETTINGS.batching else max(1, available_cpus() // api_worker_count())
        self.classifier: Classifier = load_classifier(locate_model(), threads=threads)
        self.metrics = get_metrics()
        record_model_loaded(self.classifier, time.perf_counter() - started)

    async def _preprocess(self, uploads: list[UploadFile]) -> np.ndarray:
        """Decode and preprocess uploads: ``(N, H, W, C)`` uint8. Large work goes to a thread so
        the event loop keeps serving; a small image is done in place, faster than a thread hop."""

        def run() -> np.ndarray:
            batch = np.empty((len(uploads), *self.classifier.spec.shape), dtype=np.uint8)
            for position, upload in enumerate(uploads):
                started = time.perf_counter()
                try:
                    batch[position] = preprocess_bytes(
                        upload.file.read(), self.classifier.spec, SETTINGS.max_image_pixels
                    )
                except ImageError as error:
                    raise ApiError.from_image_error(error, upload.filename) from error
                self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
            return batch

        if _is_small(uploads):
            return run()
        return await anyio.to_thread.run_sync(run)

    async def _probabilities(self, images: np.ndarray, endpoint: str) -> np.ndarray:
        """Softmax probabilities ``(N, K)``, counted in the metrics under ``endpoint``."""
        if SETTINGS.batching:
            logits = await self._logits_from_model_service(images)
        else:
            small = len(images) <= INLINE_MAX_IMAGES
            logits = (
                run_observed(self.classifier, images)
                if small
                else await anyio.to_thread.run_sync(run_observed, self.classifier, images)
            )
        probabilities = softmax(np.asarray(logits, dtype=np.float32))
        record_probabilities(self.classifier, probabilities, endpoint)
        return probabilities

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

    @api.post("/classify", summary="Classify one image")
    async def classify(
        self,
        image: Annotated[UploadFile, File(description="the image file")],
        top_k: Annotated[int | None, Form(description="labels to return (default 3)")] = None,
    ) -> JSONResponse:
        k = _parse_top_k(top_k, self.classifier.num_classes)
        probabilities = await self._probabilities(await self._preprocess([image]), "classify")
        return JSONResponse(self.classifier.describe(probabilities, k)[0])

    @api.post("/classify_batch", summary="Classify up to 64 images, answered in order")
    async def classify_batch(
        self,
        images: Annotated[list[UploadFile], File(description="the image files, in order")],
        top_k: Annotated[int | None, Form(description="labels to return (default 3)")] = None,
    ) -> JSONResponse:
        if len(images) > SETTINGS.max_batch_images:
            raise ApiError(
                400,
                "too_many_images",
                f"{len(images)} images sent; at most {SETTINGS.max_batch_images} per request",
            )
        k = _parse_top_k(top_k, self.classifier.num_classes)
        probabilities = await self._probabilities(await self._preprocess(images), "classify_batch")
        return JSONResponse({"predictions": self.classifier.describe(probabilities, k)})

    # --- the try-it page, model description, API documentation --------------------------------

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(_page_html())

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> FileResponse:
        # BentoML's own OpenAPI page, moved from / to make room for the try-it page.
        return FileResponse(_bentoml_openapi_page())

    @api.get("/model", summary="The served model: name, version, labels and input")
    async def model_description(self) -> JSONResponse:
        return JSONResponse(
            {
                "name": self.classifier.name,
                "version": self.classifier.version,
                "labels": self.classifier.labels,
                "image": self.classifier.spec.to_dict(),
            }
        )

    # --- Open Inference Protocol (KServe V2 / Triton), REST ---------------------------------

    def _check_model(self, name: str, version: str | None = None) -> None:
        if name != self.classifier.name or version not in (None, self.classifier.version):
            shown = name if version is None else f"{name} version {version}"
            raise ApiError(
                404,
                "model_not_found",
                f"no model {shown}; this server serves {self.classifier.name} version "
                f"{self.classifier.version}",
            )

    @api.get("/v2/health/live", summary="OIP: server liveness")
    async def oip_live(self) -> JSONResponse:
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready", summary="OIP: server readiness")
    async def oip_ready(self) -> JSONResponse:
        return JSONResponse({"ready": True})

    @api.get("/v2", summary="OIP: server metadata")
    async def oip_server_metadata(self) -> JSONResponse:
        return JSONResponse(
            {
                "name": "image-classifier",
                "version": "1",
                "extensions": ["binary_tensor_data", "classification"],
            }
        )

    def _model_metadata(self) -> dict:
        spec, model = self.classifier.spec, self.classifier
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {
                    "name": oip.INPUT_NAME,
                    "datatype": "FP32",
                    "shape": [-1, spec.height, spec.width, spec.channels],
                }
            ],
            "outputs": [
                {"name": oip.PROBABILITIES, "datatype": "FP32", "shape": [-1, model.num_classes]}
            ],
        }

    @api.get("/v2/models/{name}", summary="OIP: model metadata")
    async def oip_model_metadata(self, name: str) -> JSONResponse:
        self._check_model(name)
        return JSONResponse(self._model_metadata())

    @api.get("/v2/models/{name}/versions/{version}", summary="OIP: model version metadata")
    async def oip_model_version_metadata(self, name: str, version: str) -> JSONResponse:
        self._check_model(name, version)
        return JSONResponse(self._model_metadata())

    @api.get("/v2/models/{name}/ready", summary="OIP: model readiness")
    async def oip_model_ready(self, name: str) -> JSONResponse:
        self._check_model(name)
        return JSONResponse({"name": name, "ready": True})

    @api.get("/v2/models/{name}/versions/{version}/ready", summary="OIP: model version readiness")
    async def oip_model_version_ready(self, name: str, version: str) -> JSONResponse:
        self._check_model(name, version)
        return JSONResponse({"name": name, "ready": True})

    async def _infer(self, request: Request) -> Response:
        body = await request.body()
        decoded = oip.decode_request(
            body,
            request.headers.get(oip.HEADER_LENGTH),
            self.classifier.spec,
            SETTINGS.max_batch_images,
        )
        probabilities = await self._probabilities(decoded.images, "v2_infer")
        content, headers = oip.encode_response(
            decoded,
            probabilities,
            self.classifier.labels,
            self.classifier.name,
            self.classifier.version,
        )
        media_type = headers.pop("content-type")
        return Response(content, media_type=media_type, headers=headers)

    @api.post("/v2/models/{name}/infer", summary="OIP: inference (JSON or binary tensors)")
    async def oip_infer(self, name: str, request: Request) -> Response:
        self._check_model(name)
        return await self._infer(request)

    @api.post("/v2/models/{name}/versions/{version}/infer", summary="OIP: versioned inference")
    async def oip_version_infer(self, name: str, version: str, request: Request) -> Response:
        self._check_model(name, version)
        return await self._infer(request)


# Outermost first: every error body gets the JSON shape, oversized bodies are cut off early.
ImageClassifier.add_asgi_middleware(JsonErrorMiddleware)
ImageClassifier.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=SETTINGS.max_request_bytes)
