"""The Open Inference Protocol's REST routes (KServe V2 / Triton) under ``/v2``: health, server
and model metadata, readiness, and inference in JSON or binary tensors. The wire format itself is
:mod:`service.oip`; each route runs on the worker's :class:`service.service.ImageClassifier`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import oip
from service.errors import ApiError
from service.routes import served

router = APIRouter(prefix="/v2")


def checked_model(request: Request, name: str, version: str | None = None):
    """The served classifier, if it is the model (and version) the path names; else 404."""
    classifier = served(request).classifier
    if name != classifier.name or version not in (None, classifier.version):
        shown = name if version is None else f"{name} version {version}"
        raise ApiError(
            404,
            "model_not_found",
            f"no model {shown}; this server serves {classifier.name} version {classifier.version}",
        )
    return classifier


@router.get("/health/live", summary="OIP: server liveness")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/health/ready", summary="OIP: server readiness")
async def ready() -> JSONResponse:
    return JSONResponse({"ready": True})


@router.get("", summary="OIP: server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse(
        {
            "name": "image-classifier",
            "version": "1",
            "extensions": ["binary_tensor_data", "classification"],
        }
    )


@router.get("/models/{name}", summary="OIP: model metadata")
async def model_metadata(name: str, request: Request) -> JSONResponse:
    return JSONResponse(oip.model_metadata(checked_model(request, name).contract))


@router.get("/models/{name}/versions/{version}", summary="OIP: model version metadata")
async def model_version_metadata(name: str, version: str, request: Request) -> JSONResponse:
    return JSONResponse(oip.model_metadata(checked_model(request, name, version).contract))


@router.get("/models/{name}/ready", summary="OIP: model readiness")
async def model_ready(name: str, request: Request) -> JSONResponse:
    checked_model(request, name)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="OIP: model version readiness")
async def model_version_ready(name: str, version: str, request: Request) -> JSONResponse:
    checked_model(request, name, version)
    return JSONResponse({"name": name, "ready": True})


async def _infer(request: Request, classifier) -> Response:
    service = served(request)
    decoded = oip.decode_request(
        await request.body(),
        request.headers.get(oip.HEADER_LENGTH),
        classifier.contract,
        service.settings.max_batch_images,
    )
    predictions = await service.infer(decoded.images, "v2_infer")
    content, headers = oip.encode_response(
        decoded, predictions, classifier.contract, service.settings.unknown_label
    )
    media_type = headers.pop("content-type")
    return Response(content, media_type=media_type, headers=headers)


@router.post("/models/{name}/infer", summary="OIP: inference (JSON or binary tensors)")
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, checked_model(request, name))


@router.post("/models/{name}/versions/{version}/infer", summary="OIP: versioned inference")
async def version_infer(name: str, version: str, request: Request) -> Response:
    return await _infer(request, checked_model(request, name, version))
