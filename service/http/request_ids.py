"""Request ids: the caller's ``X-Request-ID`` when it sends one (as proxies and meshes expect),
else one the service makes. Every answer carries its image's id, which ``POST /feedback`` names.
An id that could smuggle anything into logs or file names is refused."""

from __future__ import annotations

import re
import uuid

from fastapi import Request

from service.http.errors import ApiError

HEADER = "x-request-id"
MAX_LENGTH = 128
# Letters, digits and . _ : - only: safe in a log line, a file name and a metrics-free store.
PATTERN = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}$")


def request_id_of(request: Request) -> str:
    """The request's id: its ``X-Request-ID`` if it sent one, else a new random one.

    Raises:
        ApiError: 400 for an id that is too long or holds other characters.
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
    return sent
