"""API errors: one JSON shape, ``{"error": "<code>", "detail": "<what to fix>"}``, with a 4xx
status, built by :func:`error_body` alone; the FastAPI handlers that give every error that shape;
and the ASGI middleware that refuses request bodies over the size limit."""

from __future__ import annotations

import json
import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.metrics import record_error
from service.preprocessing import ImageError

log = logging.getLogger(__name__)

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

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    @classmethod
    def from_image_error(cls, error: ImageError, filename: str | None = None) -> ApiError:
        detail = f"{filename}: {error.detail}" if filename else error.detail
        return cls(IMAGE_ERROR_STATUS.get(error.code, 400), error.code, detail)

    def body(self) -> dict:
        return error_body(self.code, self.detail)


async def send_json_error(send, status: int, code: str, detail: str, close: bool = False) -> None:
    """Answer an ASGI request with ``{"error": code, "detail": detail}``."""
    body = error_bytes(code, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# A refused body is read and dropped up to this size before the 413 is sent; past it the
# connection is closed under the client, which a client then sees as a reset.
DRAIN_MAX_BYTES = 256 * 1024 * 1024


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with 413 and a JSON error.

    BentoML sets no limit of its own. A declared ``Content-Length`` over the limit is refused
    before anything is read; a chunked body is counted as it streams, and the request is cut off
    as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _drain(self, receive, already: int = 0) -> None:
        """Read (and drop) the rest of a refused body, up to a bound: a client still sending when
        the connection closes sees a reset instead of our 413."""
        received = already
        while received <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _refuse(self, send) -> None:
        detail = (
            f"the request body is over the limit of {self.max_bytes} bytes; send fewer or "
            "smaller images (the limit is MAX_REQUEST_BYTES)"
        )
        await send_json_error(send, 413, "body_too_large", detail, close=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            return await self._refuse(send)

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal response_started
            if exceeded:
                return  # our 413 replaces whatever the app tried to answer
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._drain(receive, received)
            await self._refuse(send)


class _BodyTooLarge(Exception):
    pass


def _as_error_body(status: int, body: bytes) -> bytes | None:
    """Our JSON shape for an error body, or None if it already has it."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text) if text else None
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and {"error", "detail"} <= parsed.keys():
        return None
    if isinstance(parsed, list):  # BentoML wraps its own errors in a list
        text = "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in parsed
        )
    elif isinstance(parsed, dict):
        text = str(parsed.get("error") or parsed.get("detail") or parsed)
    return error_bytes(code_for_status(status), text or f"HTTP {status}")


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


class JsonErrorMiddleware:
    """Give every 4xx/5xx answer, BentoML's own included, the body ``{"error", "detail"}``, and
    count it in ``classifier_request_errors_total`` by endpoint and code."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held_start = None
        response_sent = False
        chunks: list[bytes] = []

        async def rewriting_send(message):
            nonlocal held_start, response_sent
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held_start = message
                return
            if held_start is None:
                response_sent = True
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            replacement = _as_error_body(held_start["status"], body)
            record_error(scope.get("path", ""), _error_code(replacement or body))
            headers = [
                (name, value)
                for name, value in held_start.get("headers", [])
                if name.lower() not in (b"content-length", b"content-type")
            ]
            body = body if replacement is None else replacement
            content_type = b"application/json"
            if replacement is None:
                content_type = dict(held_start.get("headers", [])).get(
                    b"content-type", content_type
                )
            headers += [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({**held_start, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            held_start, response_sent = None, True

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:
            # Starlette re-raises after answering 500; answering here (once) keeps BentoML's outer
            # error handler from trying to answer a second time and dropping the connection.
            log.exception("unhandled error on %s", scope.get("path"))
            if held_start is None and not response_sent:
                record_error(scope.get("path", ""), "internal_error")
                await send_json_error(send, 500, "internal_error", "the server failed; try again")


def install_error_handlers(app) -> None:
    """Answer FastAPI's and Starlette's errors, and our :class:`ApiError`, with the JSON body."""

    @app.exception_handler(ApiError)
    async def _api_error(_, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

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
