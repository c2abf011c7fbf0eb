"""Request bodies read under a limit of the route's own, and JSON parsed under a depth limit.

A JSON route needs far less than the service-wide ``MAX_REQUEST_BYTES``: its body is refused as
soon as it passes the route's limit, declared or streamed, and its nesting is checked before it
is parsed (Python's parser would otherwise recurse until its own limit)."""

from __future__ import annotations

import json
import re

from fastapi import Request

from service.http.errors import ApiError


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, at most ``limit`` bytes.

    Raises:
        ApiError: 413 ``body_too_large`` for a body (declared or sent) over ``limit``.
    """

    def too_large() -> ApiError:
        return ApiError(
            413, "body_too_large", f"{what} is over the limit of {limit} bytes for this route"
        )

    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large()
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


# JSON bodies nest at most this deep (an OIP request's ``inputs[0].data`` of an
# (N, H, W, C) tensor is 6 levels).
MAX_JSON_DEPTH = 32
_BRACKETS = re.compile(rb"[\[\]{}]")


def _depth_within(text: bytes, limit: int) -> bool:
    """Whether the JSON's brackets nest at most ``limit`` deep (brackets inside strings count
    too, which only errs towards refusing): a C-speed scan, before anything is parsed."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return True
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return False
    return True


def parse_json(text: bytes, what: str) -> object:
    """``text`` parsed as JSON, nesting at most :data:`MAX_JSON_DEPTH` deep.

    Raises:
        ApiError: 400 ``invalid_json`` for what is not JSON, ``json_too_deep`` past the depth.
    """
    if not _depth_within(text, MAX_JSON_DEPTH):
        raise ApiError(400, "json_too_deep", f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # a decode error, or an integer too long
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON ({exc})") from None
