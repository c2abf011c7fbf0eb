"""The HTTP API: ``/classify`` (multipart or the raw image as the body), ``/classify_batch``,
``/model``, the try-it page at ``/`` and the API documentation at ``/docs``. The routes only parse
requests: the worker's :class:`service.http.pipeline.ClassificationService` (the typed
dependency :data:`service.http.pipeline.Service`) does the rest. They are plain functions, so no
request pays BentoML's per-request thread hop for a class-method route's ``self``."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from service.core import explain
from service.http.endpoints import CLASSIFY, CLASSIFY_BATCH
from service.http.errors import ApiError
from service.http.metrics import exposition
from service.http.pipeline import Service
from service.http.request_ids import HEADER, request_id_of
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


async def raw_image(request: Request) -> UploadFile:
    """The request body as the one image, when it is sent raw (not as a form)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in FORM_TYPES:
        raise ApiError(
            400,
            "missing_field",
            "image: Field required; send multipart/form-data with the image file in the field "
            "named image, or the image itself as the body with Content-Type image/png, "
            "image/jpeg, ...",
        )
    if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type or 'none'} is not an image: send multipart/form-data, or "
            "the raw image with Content-Type image/png, image/jpeg, ...",
        )
    body = await request.body()
    return UploadFile(io.BytesIO(body), size=len(body), filename=None)


def explain_mode(raw: str | None) -> str:
    try:
        return explain.explain_mode(raw)
    except explain.ExplainError as error:
        raise ApiError(400, "invalid_field", str(error)) from None


def query_top_k(request: Request) -> int | None:
    raw = request.query_params.get("top_k")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_field", f"top_k: {raw!r} is not a whole number") from None


@router.post(
    CLASSIFY.path,
    summary="Classify one image: multipart field 'image', or the raw image as the body",
    openapi_extra={"requestBody": {"content": RAW_IMAGE_CONTENT}},
)
async def classify(
    request: Request,
    service: Service,
    image: Annotated[UploadFile | None, File(description="the image file")] = None,
    top_k: Annotated[int | None, Form(description=TOP_K_HELP)] = None,
    explain: Annotated[str | None, Query(description=EXPLAIN_HELP)] = None,
) -> JSONResponse:
    request_id = request_id_of(request)
    mode = explain_mode(explain)
    if image is None:
        # Not multipart: the body is the image itself (Content-Type image/png, image/jpeg, ...),
        # parsed by no form parser, with top_k in the query string.
        image = await raw_image(request)
        top_k = query_top_k(request)
    answers = await service.classify([image], top_k, CLASSIFY.label, request_id, mode)
    return JSONResponse(answers.to_dicts()[0], headers={HEADER: request_id})


@router.post(
    CLASSIFY_BATCH.path,
    summary=f"Classify up to {MAX_IMAGES} images, answered in order",
)
async def classify_batch(
    request: Request,
    service: Service,
    images: Annotated[list[UploadFile], File(description="the image files, in order")],
    top_k: Annotated[int | None, Form(description=TOP_K_HELP)] = None,
    explain: Annotated[str | None, Query(description=EXPLAIN_HELP)] = None,
) -> JSONResponse:
    request_id = request_id_of(request)
    mode = explain_mode(explain)
    limit = service.settings.max_batch_images
    if len(images) > limit:
        raise ApiError(
            400, "too_many_images", f"{len(images)} images sent; at most {limit} per request"
        )
    answers = await service.classify(images, top_k, CLASSIFY_BATCH.label, request_id, mode)
    return JSONResponse({"predictions": answers.to_dicts()}, headers={HEADER: request_id})


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
    contract = service.classifier.contract
    return JSONResponse(contract.summary_for_clients() | {"batching": service.batching})
