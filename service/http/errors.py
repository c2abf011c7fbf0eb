"""API errors: one JSON shape, ``{"error": "<code>", "detail": "<what to fix>"}``, with a 4xx
status, built by :func:`error_body` alone, and the FastAPI handlers that give every error that
shape. The ASGI middleware that gives errors from outside the routes the same shape is in
:mod:`service.http.middleware`."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.core.postprocessing import TopKError
from service.core.preprocessing import ImageError

# HTTP status of each image error code of the shared preprocessing function.
IMAGE_ERROR_STATUS = {
    "empty_file": 400,
    "not_an_image": 415,
    "corrupt_image": 400,
    "image_too_large": 413,
}
# The error code of an HTTP status that no handler of ours named (BentoML's and Starlette's own
# answers, e.g. an unknown path); any other status becomes ``http_<status>``.
STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def code_for_status(status: int) -> str:
    return STATUS_CODES.get(status, f"http_{status}")


def error_body(code: str, detail: str) -> dict:
    """The one JSON body of every error answer."""
    return {"error": code, "detail": detail}


def error_bytes(code: str, detail: str) -> bytes:
    return json.dumps(error_body(code, detail)).encode()


class ApiError(Exception):
    """An error the client can fix; becomes a JSON response with ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers

    @classmethod
    def from_image_error(cls, error: ImageError, filename: str | None = None) -> ApiError:
        detail = f"{filename}: {error.detail}" if filename else error.detail
        return cls(IMAGE_ERROR_STATUS.get(error.code, 400), error.code, detail)

    @classmethod
    def from_top_k_error(cls, error: TopKError) -> ApiError:
        return cls(400, "top_k_out_of_range", str(error))

    def body(self) -> dict:
        return error_body(self.code, self.detail)


def install_error_handlers(app) -> None:
    """Answer FastAPI's and Starlette's errors, and our :class:`ApiError`, with the JSON body."""

    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        code = "missing_field" if first.get("type") == "missing" else "invalid_field"
        detail = f"{field}: {first.get('msg', 'invalid')}"
        if code == "missing_field":
            detail += "; send multipart/form-data with the image file(s) in the field named there"
        return JSONResponse(error_body(code, detail), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_, error: HTTPException) -> JSONResponse:
        body = error_body(code_for_status(error.status_code), str(error.detail))
        return JSONResponse(body, status_code=error.status_code)
