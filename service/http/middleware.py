"""The service's own ASGI middleware, outermost first: keep-alive connections recycled across the
API workers, every error answer given the JSON shape and counted, and request bodies over the
size limit refused.

Connection recycling: each connection is closed, politely, after a number of requests, and its
client reconnects.

BentoML's API workers share one listening socket, and a burst of new connections is accepted by
whichever worker wakes first, which then keeps them all for as long as they stay open (BentoML
issue #5426): one core serves while the other idles. A reconnecting client is accepted by a
worker that is waiting for work, which is the idle one, so recycling connections moves load to
where the CPU is free. This is nginx's ``keepalive_requests`` and Envoy's
``max_requests_per_connection``; a reconnect on loopback or in a cluster costs far less than a
request.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable

from service.http.errors import code_for_status, error_bytes

log = logging.getLogger(__name__)

# Connections tracked per worker; the oldest are forgotten first (a client that left on its own).
TRACKED_CONNECTIONS = 4096


class ConnectionRecycleMiddleware:
    """Answer the ``max_requests``-th request of each connection with ``Connection: close``."""

    def __init__(self, app, max_requests: int):
        self.app = app
        self.max_requests = max_requests
        self.served: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope, receive, send):
        client = scope.get("client") if scope["type"] == "http" else None
        if self.max_requests <= 0 or client is None:
            return await self.app(scope, receive, send)
        key = tuple(client)
        count = self.served.pop(key, 0) + 1
        if count >= self.max_requests:
            last = True
        else:
            last = False
            self.served[key] = count
            if len(self.served) > TRACKED_CONNECTIONS:
                self.served.popitem(last=False)

        async def closing_send(message):
            if last and message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, closing_send if last else send)


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
    report it to ``count_error(path, code)`` (the metrics count it by endpoint and code)."""

    def __init__(self, app, count_error: Callable[[str, str], None]):
        self.app = app
        self.count_error = count_error

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
            self.count_error(scope.get("path", ""), _error_code(replacement or body))
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
                self.count_error(scope.get("path", ""), "internal_error")
                await send_json_error(send, 500, "internal_error", "the server failed; try again")
