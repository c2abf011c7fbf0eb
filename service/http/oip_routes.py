"""The Open Inference Protocol's REST routes (KServe V2 / Triton) under ``/v2``: health, server
and model metadata, readiness, and inference in JSON or binary tensors. The wire format itself is
:mod:`service.http.oip`; inference runs through the worker's request pipeline
(:data:`service.http.pipeline.Service`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.core.classifier import Classifier
from service.http import oip
from service.http.bodies import read_body
from service.http.endpoints import V2_INFER, V2_VERSION_INFER
from service.http.errors import ApiError
from service.http.pipeline import ClassificationService, Service
from service.http.request_ids import echoed, request_id_of

router = APIRouter()


def checked_model(
    service: ClassificationService, name: str, version: str | None = None
) -> Classifier:
    """The served classifier, if it is the model (and version) the path names; else 404."""
    classifier = service.classifier
    if name != classifier.name or version not in (None, classifier.version):
        shown = name if version is None else f"{name} version {version}"
        raise ApiError(
            404,
            "model_not_found",
            f"no model {shown}; this server serves {classifier.name} version {classifier.version}",
        )
    return classifier


@router.get("/v2/health/live", summary="OIP: server liveness")
async def live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/v2/health/ready", summary="OIP: server readiness")
async def ready() -> JSONResponse:
    return JSONResponse({"ready": True})


@router.get("/v2", summary="OIP: server metadata")
async def server_metadata() -> JSONResponse:
    return JSONResponse(
        {
            "name": "image-classifier",
            "version": "1",
            "extensions": ["binary_tensor_data", "classification"],
        }
    )


@router.get("/v2/models/{name}", summary="OIP: model metadata")
async def model_metadata(name: str, service: Service) -> JSONResponse:
    return JSONResponse(oip.model_metadata(checked_model(service, name).contract))


@router.get("/v2/models/{name}/versions/{version}", summary="OIP: model version metadata")
async def model_version_metadata(name: str, version: str, service: Service) -> JSONResponse:
    return JSONResponse(oip.model_metadata(checked_model(service, name, version).contract))


@router.get("/v2/models/{name}/ready", summary="OIP: model readiness")
async def model_ready(name: str, service: Service) -> JSONResponse:
    checked_model(service, name)
    return JSONResponse({"name": name, "ready": True})


@router.get("/v2/models/{name}/versions/{version}/ready", summary="OIP: model version readiness")
async def model_version_ready(name: str, version: str, service: Service) -> JSONResponse:
    checked_model(service, name, version)
    return JSONResponse({"name": name, "ready": True})


async def _infer(
    request: Request, service: ClassificationService, classifier: Classifier, endpoint: str
) -> Response:
    """Inference on ``classifier``: the version the route checked, even if a new one takes
    over while the body is read."""
    request_id = request_id_of(request)
    contract = classifier.contract
    limit = oip.max_body_bytes(contract, service.settings.max_batch_images)
    decoded = oip.decode_request(
        await read_body(request, limit, "the inference request"),
        request.headers.get(oip.HEADER_LENGTH),
        contract,
        service.settings.max_batch_images,
    )
    top_k = oip.classification_count(decoded, contract.num_classes)
    answers = await service.classify(
        decoded.images, top_k, endpoint, request_id, classifier=classifier
    )
    content, headers = oip.encode_response(decoded, answers)
    headers.update(echoed(request, request_id))
    media_type = headers.pop("content-type")
    return Response(content, media_type=media_type, headers=headers)


@router.post(V2_INFER.path, summary="OIP: inference (JSON or binary tensors)")
async def infer(name: str, request: Request, service: Service) -> Response:
    return await _infer(request, service, checked_model(service, name), V2_INFER.label)


@router.post(V2_VERSION_INFER.path, summary="OIP: versioned inference")
async def version_infer(name: str, version: str, request: Request, service: Service) -> Response:
    classifier = checked_model(service, name, version)
    return await _infer(request, service, classifier, V2_VERSION_INFER.label)
