"""The service's one ASGI middleware, inside BentoML's: each request's count and duration by
endpoint and status, every error answer given the JSON shape (and counted by its code), request
bodies over the size limit refused, and keep-alive connections recycled across the API workers.
One wrapper of ``receive`` and one of ``send`` per request do all four. The hot routes are
answered here too, without the mounted app's stack (:mod:`service.http.fast_path`), inside the
same wrappers.

**Connection recycling.** BentoML's API workers share one listening socket, and a burst of new
connections is accepted by whichever worker wakes first, which then keeps them all for as long
as they stay open (BentoML issue #5426): one core serves while the other idles. Each connection
is therefore closed, politely (``Connection: close`` on a response), after a number of requests;
the client reconnects, and a worker that is waiting for work, the idle one, accepts it. This is
nginx's ``keepalive_requests`` and Envoy's ``max_requests_per_connection``; a reconnect on
loopback or in a cluster costs far less than a request.

**The body limit.** BentoML sets none. A declared ``Content-Length`` over the limit is refused
before anything is read; a chunked body is counted as it streams, and the request is cut off as
soon as it passes the limit.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from service.http.errors import code_for_status, error_bytes

if TYPE_CHECKING:
    from service.http.fast_path import FastPath

log = logging.getLogger(__name__)

# Connections tracked per worker; the oldest are forgotten first (a client that left on its own).
TRACKED_CONNECTIONS = 4096
# A refused body is read and dropped up to this size before the 413 is sent; past it the
# connection is closed under the client, which a client then sees as a reset.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
CONNECTION_CLOSE = (b"connection", b"close")


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


async def send_json_error(send, status: int, code: str, detail: str, close: bool = False) -> None:
    """Answer an ASGI request with ``{"error": code, "detail": detail}``."""
    body = error_bytes(code, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append(CONNECTION_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServiceMiddleware:
    """The four jobs above, for every HTTP request.

    Args:
        observe: ``(path, status, seconds)`` once each request is answered (the metrics).
        count_error: ``(path, code)`` for each error answer (the metrics).
        max_bytes: the largest request body (``MAX_REQUEST_BYTES``).
        max_requests: requests per keep-alive connection (``MAX_REQUESTS_PER_CONNECTION``);
            0 keeps connections open.
        fast_path: the hot routes this middleware answers itself (``FAST_PATH``); None sends
            every request on to the app.
    """

    def __init__(
        self,
        app,
        observe: Callable[[str, int, float], None],
        count_error: Callable[[str, str], None],
        max_bytes: int,
        max_requests: int,
        timeout_seconds: float = 60.0,
        fast_path: FastPath | None = None,
    ):
        self.app = app
        self.fast_path = fast_path
        self.timeout_seconds = timeout_seconds
        self.observe = observe
        self.count_error = count_error
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.served: OrderedDict[tuple, int] = OrderedDict()

    def _is_last_of_connection(self, client) -> bool:
        """Whether this request is the connection's ``max_requests``-th (then it is closed)."""
        if self.max_requests <= 0 or client is None:
            return False
        key = tuple(client)
        count = self.served.pop(key, 0) + 1
        if count >= self.max_requests:
            return True
        self.served[key] = count
        if len(self.served) > TRACKED_CONNECTIONS:
            self.served.popitem(last=False)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        exchange = _Exchange(self, scope, receive, send)
        try:
            with anyio.move_on_after(self.timeout_seconds) as deadline:
                await exchange.run()
            if deadline.cancelled_caught and not exchange.started:
                detail = (
                    f"the request took over {self.timeout_seconds:g} seconds, its body included "
                    "(REQUEST_TIMEOUT_SECONDS)"
                )
                # Closed: the client may still be sending a body it never finishes.
                await exchange._answer_error(504, "timeout", detail, close=True)
        except anyio.get_cancelled_exc_class():
            if not exchange.started:
                # BentoML's own timeout, a backstop outside this middleware, cancelled it and
                # answers a 504: count it as that, not as the 500 of an unanswered request.
                exchange.status = 504
                self.count_error(exchange.path, "timeout")
            raise
        finally:
            self.observe(scope.get("path", ""), exchange.status, time.perf_counter() - started)

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

    async def _refuse_body(self, send) -> None:
        detail = (
            f"the request body is over the limit of {self.max_bytes} bytes; send fewer or "
            "smaller images (the limit is MAX_REQUEST_BYTES)"
        )
        await send_json_error(send, 413, "body_too_large", detail, close=True)


class _Exchange:
    """One request through :class:`ServiceMiddleware`: its wrapped ``receive`` and ``send``."""

    def __init__(self, middleware: ServiceMiddleware, scope, receive, send):
        self.middleware, self.scope = middleware, scope
        self._receive, self._send = receive, send
        self.path = scope.get("path", "")
        self.last = middleware._is_last_of_connection(scope.get("client"))
        self.status = 500  # until a response starts
        self.received = 0
        self.exceeded = False
        self.started = False  # a response start went out
        self.held: dict | None = None  # an error response's start, until its body is rewritten
        self.chunks: list[bytes] = []

    async def run(self) -> None:
        middleware = self.middleware
        headers = dict(self.scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > middleware.max_bytes:
            await middleware._drain(self._receive)
            return await self._refuse()
        fast = middleware.fast_path
        found = None if fast is None else fast.route_for(self.scope)
        try:
            if found is None:
                await middleware.app(self.scope, self.receive, self.send)
            else:
                await fast.answer(found, self.scope, self.receive, self.send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not self.exceeded:
                # Starlette re-raises after answering 500; answering here (once) keeps BentoML's
                # outer error handler from answering a second time and dropping the connection.
                log.exception("unhandled error on %s", self.path)
                if self.held is None and not self.started:
                    await self._answer_error(500, "internal_error", "the server failed; try again")
                return
        if self.exceeded and not self.started:
            await middleware._drain(self._receive, self.received)
            await self._refuse()

    async def _refuse(self) -> None:
        self.status = 413
        self.middleware.count_error(self.path, "body_too_large")
        self.started = True
        await self.middleware._refuse_body(self._send)

    async def _answer_error(self, status: int, code: str, detail: str, close: bool = False) -> None:
        self.status, self.started = status, True
        self.middleware.count_error(self.path, code)
        await send_json_error(self._send, status, code, detail, close=close or self.last)

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.middleware.max_bytes:
                self.exceeded = True
                raise _BodyTooLarge
        return message

    async def send(self, message):
        if self.exceeded:
            return  # the 413 replaces whatever the app tried to answer
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.last:
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*kept, CONNECTION_CLOSE]}
            if self.status >= 400:
                self.held = message
                return
            self.started = True
            return await self._send(message)
        if self.held is None:
            return await self._send(message)
        self.chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            await self._send_error_body()

    async def _send_error_body(self) -> None:
        """The held error answer, its body in the JSON shape, counted by its code."""
        held, body = self.held, b"".join(self.chunks)
        replacement = _as_error_body(held["status"], body)
        self.middleware.count_error(self.path, _error_code(replacement or body))
        original = dict(held.get("headers", []))
        headers = [
            (name, value)
            for name, value in held.get("headers", [])
            if name.lower() not in (b"content-length", b"content-type")
        ]
        content_type = b"application/json"
        if replacement is None:
            content_type = original.get(b"content-type", content_type)
        body = body if replacement is None else replacement
        headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        self.started = True
        await self._send({**held, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
        self.held, self.chunks = None, []
