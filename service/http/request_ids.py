"""Request ids: every answer carries the id that ``POST /feedback`` names it by, and the service
makes each one unique, so that a label binds to exactly one input.

A caller's ``X-Request-ID`` (as proxies and meshes send) is kept as the start of the id, and the
service adds a random suffix: ``order-1042`` is answered as ``order-1042.<16 hex digits>``. A
client that reuses an id, by mistake or to attach someone else's label to its own image, gets
another id, which it cannot guess. The response's ``X-Request-ID`` header echoes the caller's own
value (else the id), for tracing. An id that could smuggle anything into logs or file names is
refused."""

from __future__ import annotations

import re
import secrets
import uuid

from fastapi import Request

from service.http.errors import ApiError

HEADER = "x-request-id"
MAX_LENGTH = 128
SUFFIX_HEX_DIGITS = 16
# Letters, digits and . _ : - only: safe in a log line, a file name and a metrics-free store.
_CHARACTERS = "A-Za-z0-9._:-"
PATTERN = re.compile(rf"^[{_CHARACTERS}]{{1,{MAX_LENGTH}}}$")
# An id the service issues: a caller's id and the suffix, and a batch position (``-63``).
ISSUED_MAX_LENGTH = MAX_LENGTH + 1 + SUFFIX_HEX_DIGITS + 8
ISSUED_PATTERN = re.compile(rf"^[{_CHARACTERS}]{{1,{ISSUED_MAX_LENGTH}}}$")


def request_id_of(request: Request) -> str:
    """The request's id, unique to it: its ``X-Request-ID`` with a random suffix if it sent
    one, else a new random one.

    Raises:
        ApiError: 400 for an ``X-Request-ID`` that is too long or holds other characters.
    """
    sent = request.headers.get(HEADER)
    if sent is None:
        return uuid.uuid4().hex
    if not PATTERN.match(sent):
        raise ApiError(
            400,
            "invalid_request_id",
            f"X-Request-ID must be 1 to {MAX_LENGTH} letters, digits or . _ : - characters",
        )
    return f"{sent}.{secrets.token_hex(SUFFIX_HEX_DIGITS // 2)}"


def echoed(request: Request, request_id: str) -> dict[str, str]:
    """The response's ``X-Request-ID`` header: the caller's own, else the id it was given."""
    return {HEADER: request.headers.get(HEADER) or request_id}
