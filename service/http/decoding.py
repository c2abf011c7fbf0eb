"""Image decoding in an API worker, bounded by design: each image's decode cost is checked from
its header before any pixel is decoded (:func:`service.core.preprocessing.inspect_image`), at most
``MAX_DECODES_IN_FLIGHT`` decodes run at once, each in a thread, and at most
``MAX_DECODES_WAITING`` requests wait for one; past that a request gets 503 ``busy`` with
``Retry-After``. Only an image that is tiny once decoded (a 28x28 PNG: about 0.1 ms) is decoded on
the event loop, where a thread hop would cost more than the decode.

So the decode memory of a worker is bounded by the settings: about two copies of the largest
decoded image (the decode and one conversion) per decode in flight. After a large decode, the
memory is handed back to the system (glibc's ``malloc_trim``), so that a burst of large images
does not leave the worker at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import anyio

from service.http.errors import ApiError

log = logging.getLogger(__name__)

# A file up to this size is read, and its header checked, on the event loop; larger ones are
# read in a decode thread.
INLINE_MAX_UPLOAD_BYTES = 256 * 1024
# An image whose decoded pixels take less than this is decoded on the event loop.
INLINE_MAX_DECODED_BYTES = 256 * 1024
# After a decode of more than this, the worker's free memory is returned to the system.
TRIM_AFTER_BYTES = 8 * 2**20
RETRY_AFTER_SECONDS = 1
# glibc's mallopt parameter: allocations from this size up are mapped, and unmapped when freed.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1024 * 1024


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def quiet_pillow() -> None:
    """Pillow logs every chunk of a PNG, and every tag of an EXIF block, at debug level: a file
    with many of them would write thousands of lines per request. Its warnings are silenced
    where images are decoded (:func:`service.core.preprocessing.load_image`)."""
    logging.getLogger("PIL").setLevel(logging.ERROR)


def keep_memory_returnable() -> None:
    """Once per worker: glibc raises its mapping threshold after each large free, up to 32 MiB,
    so that the next decodes land in its heap, which it keeps. A fixed threshold keeps every
    large buffer mapped, and returned when freed. A no-op where the C library is not glibc."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Return the free memory of every heap (decode threads have their own) to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class DecodeGate:
    """At most ``in_flight`` decodes at once in this worker, and ``waiting`` requests queued.

    Args:
        in_flight: decodes running at once (threads).
        waiting: requests that may wait for a decode slot; one more gets 503 ``busy``.
    """

    def __init__(self, in_flight: int, waiting: int) -> None:
        self.in_flight = max(1, in_flight)
        self.limit = self.in_flight + max(0, waiting)
        self._limiter: anyio.CapacityLimiter | None = None
        self.inside = 0  # requests decoding or waiting to

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Made in the event loop that uses it (a limiter belongs to its loop).
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.in_flight)
        return self._limiter

    async def run(self, work, cost: int):
        """``work()`` in a thread once a slot is free; ``cost``: the decoded bytes it holds.

        Raises:
            ApiError: 503 ``busy`` when the slots and the queue are full.
        """
        if self.inside >= self.limit:
            raise ApiError(
                503,
                "busy",
                f"this worker is decoding {self.in_flight} images and {self.limit - self.in_flight}"
                " more requests wait: try again shortly",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.inside += 1
        try:
            return await anyio.to_thread.run_sync(_then_trim, work, cost, limiter=self.limiter)
        finally:
            self.inside -= 1


def _then_trim(work, cost: int):
    try:
        return work()
    finally:
        if cost > TRIM_AFTER_BYTES:
            release_memory()
