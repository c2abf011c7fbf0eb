"""Limits on request headers, which neither BentoML nor uvicorn's httptools protocol sets: their
size, their count, and the time a client may take to send them.

Without them, a request with a 50 MB header is buffered whole, and a client sending its headers
a byte at a time (slowloris) keeps its connection, and the worker's memory for it, forever.
:class:`BoundedHttpProtocol` is uvicorn's own httptools protocol with the three limits, and
:func:`install` makes it the protocol of the API workers' uvicorn servers. Past a limit the
client gets a JSON error, ``431 headers_too_large`` or ``408 headers_timeout``, and the
connection is closed. These are nginx's ``large_client_header_buffers`` and
``client_header_timeout``, and Envoy's ``max_request_headers_kb`` and ``request_headers_timeout``.
"""

from __future__ import annotations

import asyncio
import json

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Replaced by install() from the service's settings.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100
HEADER_TIMEOUT_SECONDS = 10.0
REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _Refused(Exception):
    pass


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing headers past a size, a count or a deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refused = False
        self._begun = False  # a request has started on this connection
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            # Checked before this chunk is parsed: at most the limit and one chunk are held.
            if self._header_bytes > MAX_HEADER_BYTES:
                return self._refuse(431, "headers_too_large", f"over {MAX_HEADER_BYTES} bytes")
            self._header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if not self._in_headers:  # the next request of a keep-alive connection
            self._in_headers, self._header_bytes, self._header_count = True, 0, 0
            self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        if self._header_count > MAX_HEADER_COUNT:
            self._refuse(431, "headers_too_large", f"more than {MAX_HEADER_COUNT} headers")
        else:
            # The headers' own size: the chunks counted may have held some of the body too, and
            # on a keep-alive connection the chunk that began this request was not counted.
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > MAX_HEADER_BYTES:
                self._refuse(431, "headers_too_large", f"over {MAX_HEADER_BYTES} bytes")
        if self._refused:
            raise _Refused  # stops the parser: the rest of the request is not read
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # else the parser stopped because the request was refused
            super().send_400_response(msg)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._in_headers or self.transport.is_closing():
            return
        if not self._begun and self._header_bytes == 0:
            # Nothing sent at all: closed without an answer (as nginx does), which a pooled
            # client could otherwise take for the answer to its next request.
            self._refused, self._in_headers = True, False
            self.transport.close()
            return
        self._refuse(408, "headers_timeout", f"not sent within {HEADER_TIMEOUT_SECONDS:g} seconds")

    def _refuse(self, status: int, code: str, detail: str) -> None:
        body = json.dumps({"error": code, "detail": f"the request headers were {detail}"}).encode()
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self._refused, self._in_headers = True, False
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + body)
            self.transport.close()


def install(max_header_bytes: int, max_header_count: int, header_timeout_seconds: float) -> None:
    """Make :class:`BoundedHttpProtocol`, with these limits, the HTTP protocol of the uvicorn
    servers this process starts (BentoML's API workers ask uvicorn for its default, ``auto``)."""
    global MAX_HEADER_BYTES, MAX_HEADER_COUNT, HEADER_TIMEOUT_SECONDS
    MAX_HEADER_BYTES = max_header_bytes
    MAX_HEADER_COUNT = max_header_count
    HEADER_TIMEOUT_SECONDS = header_timeout_seconds
    target = f"{__name__}:{BoundedHttpProtocol.__name__}"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = target
    uvicorn.config.HTTP_PROTOCOLS["httptools"] = target
