"""The HTTP API: ``/classify`` (multipart or the raw image as the body), ``/classify_batch``,
``/model``, the try-it page at ``/`` and the API documentation at ``/docs``. The routes only parse
requests: the worker's :class:`service.http.pipeline.ClassificationService` does the rest. The
two hot routes read their requests themselves (Starlette's form parser; no FastAPI parameter
validation), with their bodies stated for the OpenAPI page; the others take the typed
dependency :data:`service.http.pipeline.Service`. They are plain functions, so no
request pays BentoML's per-request thread hop for a class-method route's ``self``."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import anyio
from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile as FormFile

from service.core import explain
from service.http.endpoints import CLASSIFY, CLASSIFY_BATCH
from service.http.errors import ApiError
from service.http.metrics import exposition
from service.http.pipeline import Service, service_of
from service.http.request_ids import echoed, request_id_of
from service.http.settings import ServiceSettings

router = APIRouter()
# Raw bodies /classify takes besides multipart: any image type, or bytes of unnamed type.
RAW_IMAGE_CONTENT = {
    media_type: {"schema": {"type": "string", "format": "binary"}}
    for media_type in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# The documented defaults are the settings' own (a deployment may change them).
TOP_K_HELP = f"labels to return (default {ServiceSettings.default_top_k})"
MAX_IMAGES = ServiceSettings.max_batch_images
EXPLAIN_HELP = (
    "1: add cam, the class activation map of the top class (rows of numbers in 0-1); png: also "
    "overlay_png, the map laid over the image (a base64 PNG of the image's size)"
)


# The request bodies, stated for the OpenAPI page: the routes read their requests themselves.
CLASSIFY_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "the image file",
                    },
                    "top_k": {"type": "integer", "description": TOP_K_HELP},
                },
            }
        },
        **RAW_IMAGE_CONTENT,
    },
}
CLASSIFY_BATCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "the image files, in order",
                    },
                    "top_k": {"type": "integer", "description": TOP_K_HELP},
                },
            }
        }
    },
}


def query_parameter(name: str, schema: dict, description: str) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


EXPLAIN_PARAMETER = query_parameter(
    "explain", {"type": "string", "enum": ["0", "1", "png"]}, EXPLAIN_HELP
)
TOP_K_PARAMETER = query_parameter(
    "top_k", {"type": "integer"}, f"{TOP_K_HELP}, when the image is the raw body"
)
MISSING_HINT = "send multipart/form-data with the image file(s) in the field named there"


async def raw_image(request: Request, media_type: str) -> UploadFile:
    """The request body as the one image, when it is sent raw (not as a form)."""
    if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type or 'none'} is not an image: send multipart/form-data, or "
            "the raw image with Content-Type image/png, image/jpeg, ...",
        )
    body = await request.body()
    return UploadFile(io.BytesIO(body), size=len(body), filename=None)


def explain_mode(request: Request) -> str:
    try:
        return explain.explain_mode(request.query_params.get("explain"))
    except explain.ExplainError as error:
        raise ApiError(400, "invalid_field", str(error)) from None


def whole_number(name: str, raw) -> int | None:
    """A ``top_k`` from the query string or a form field: None when absent."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError(400, "invalid_field", f"{name}: a number is a text field, not a file")
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_field", f"{name}: {raw!r} is not a whole number") from None


def form_files(form, name: str) -> list[FormFile]:
    """The files of a form field, refused in the errors' JSON shape when it is absent or text."""
    values = form.getlist(name)
    if not values:
        raise ApiError(400, "missing_field", f"{name}: Field required; {MISSING_HINT}")
    if not all(isinstance(value, FormFile) for value in values):
        raise ApiError(400, "invalid_field", f"{name}: a file is expected, not a text field")
    return values


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# The hot routes read their requests themselves (Starlette's own form parser, no FastAPI
# dependency injection or validation: measured in BENCHMARKS.md); their bodies and parameters
# are stated in openapi_extra, so the OpenAPI page is as complete as before.
@router.post(
    CLASSIFY.path,
    summary="Classify one image: multipart field 'image', or the raw image as the body",
    openapi_extra={
        "requestBody": CLASSIFY_BODY,
        "parameters": [EXPLAIN_PARAMETER, TOP_K_PARAMETER],
    },
)
async def classify(request: Request) -> Response:
    service = service_of(request)
    request_id = request_id_of(request)
    mode = explain_mode(request)
    media_type = media_type_of(request)
    if media_type in FORM_TYPES:
        async with request.form() as form:
            image = form_files(form, "image")[0]
            top_k = whole_number("top_k", form.get("top_k"))
            answers = await service.classify([image], top_k, CLASSIFY.label, request_id, mode)
    else:
        # The body is the image itself (Content-Type image/png, image/jpeg, ...), parsed by no
        # form parser, with top_k in the query string.
        image = await raw_image(request, media_type)
        top_k = whole_number("top_k", request.query_params.get("top_k"))
        answers = await service.classify([image], top_k, CLASSIFY.label, request_id, mode)
    return JSONResponse(answers.to_dicts()[0], headers=echoed(request, request_id))


@router.post(
    CLASSIFY_BATCH.path,
    summary=f"Classify up to {MAX_IMAGES} images, answered in order",
    openapi_extra={"requestBody": CLASSIFY_BATCH_BODY, "parameters": [EXPLAIN_PARAMETER]},
)
async def classify_batch(request: Request) -> Response:
    service = service_of(request)
    request_id = request_id_of(request)
    mode = explain_mode(request)
    if media_type_of(request) not in FORM_TYPES:
        raise ApiError(400, "missing_field", f"images: Field required; {MISSING_HINT}")
    limit = service.settings.max_batch_images
    async with request.form() as form:
        images = form_files(form, "images")
        if len(images) > limit:
            raise ApiError(
                400, "too_many_images", f"{len(images)} images sent; at most {limit} per request"
            )
        top_k = whole_number("top_k", form.get("top_k"))
        answers = await service.classify(images, top_k, CLASSIFY_BATCH.label, request_id, mode)
    return JSONResponse({"predictions": answers.to_dicts()}, headers=echoed(request, request_id))


@functools.cache
def _page_html() -> str:
    return (Path(__file__).parent / "static" / "index.html").read_text()


def _bentoml_openapi_page() -> Path:
    import _bentoml_impl.server  # where BentoML keeps its own OpenAPI page

    return Path(_bentoml_impl.server.__file__).parent / "main-openapi.html"


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_page_html())


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    # BentoML's own OpenAPI page, moved from / to make room for the try-it page.
    return FileResponse(_bentoml_openapi_page())


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    # Read from every process's files in a thread: a scrape must not stall the event loop.
    content, media_type = await anyio.to_thread.run_sync(exposition)
    return Response(content, media_type=media_type)


@router.get("/model", summary="The served model: name, version, labels and input")
async def model_summary(service: Service) -> JSONResponse:
    classifier = service.classifier
    limits = {"max_batch_images": service.settings.max_batch_images}
    drift = {"drift": service.drift_summary(classifier)}
    summary = classifier.contract.summary_for_clients() | {"batching": service.batching}
    return JSONResponse(summary | limits | drift)
