"""Inputs kept for relabelling (``CAPTURE``): the inputs the model found hard, with their answers
and request ids, written off the request path to a folder that every worker (and, on a shared
volume, every pod) writes.

- Which: every input flagged ``unknown``; with ``hard`` also every input whose top-2 margin is
  below ``CAPTURE_MARGIN``; with ``sample:P`` also a random share P of the rest, so that the
  store holds ordinary traffic too.
- How: each entry is a folder, ``<time_ns>-<bytes>-<request id>/`` holding ``input.<ext>`` (the
  bytes as sent) and ``answer.json``, written under a ``.partial-`` name and renamed into place
  when complete, so a worker killed mid-write leaves no half-written entry (its ``.partial-``
  folder is swept later). A worker's thread does the writing; a request only appends the entry
  to a list, and the thread wakes every ``WRITE_INTERVAL`` seconds to write what is there (a
  queue's wake-up per entry cost the request thread a lock, a notify and a GIL hand-over each).
  With a model that has a class activation map, ``answer.json`` holds it too (``cam``), so a
  person labelling the input sees what the model looked at.
- Size: an entry's size is what it takes on disk, its input, its answer and its folder (in
  its name, so no ``stat`` is needed later). An input far larger than its image needs (a small
  PNG padded with megabytes of junk) is not kept, and is counted as refused: it would crowd
  out real entries.
- Bound: the entries' sizes stay under
  ``CAPTURE_MAX_BYTES``: the oldest go first, claimed by an atomic rename so that two workers
  never evict the same one, and each eviction is counted. With the prediction log on, the bound
  is kept through its database (:mod:`service.store.capture_ledger`): every writer of every
  replica admits each entry to one ledger in turn, so the store exceeds its bound by at most
  one entry per writer. Without it (or while its database is down), each worker keeps its own
  count of the store and recounts it from the folder at least every ``RESCAN_SECONDS``, so
  during a burst the store may exceed the bound by what the other workers wrote since a
  recount, until the next write after it.
- Labels: feedback for a captured input is written beside the entries, ``labels/<id>.json``,
  for ``python -m training captured`` to turn into class folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.capture_layout import (
    ANSWER_FILE,
    INPUT_STEM,
    LABELS_FOLDER,
    entry_name,
    parse_entry_name,
)
from service.core.preprocessing import FORMATS

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
EVICTING_PREFIX = ".evicting-"
# Entries waiting for the writer thread; past this, new ones are dropped (and counted).
QUEUE_SIZE = 256
# How often the writer thread wakes to write the entries handed over since.
WRITE_INTERVAL = 0.05
# How often the writer rescans the store for its size, at most (other workers write too).
RESCAN_SECONDS = 1.0
# A .partial- folder this old was left by a process that died while writing it.
STALE_PARTIAL_SECONDS = 60
# An input is kept if its file is at most this many times the bytes of its pixels (8-bit, in
# its own bands), with this much room for headers and metadata: an ordinary PNG or JPEG is
# smaller than its pixels, a padded one is not.
OVERSIZE_FACTOR = 2
OVERSIZE_ALLOWANCE = 64 * 1024


@dataclass(frozen=True)
class CapturePolicy:
    """Which inputs ``CAPTURE`` keeps."""

    mode: str  # off, unknown, hard or sample
    margin: float  # top-2 margin below which an input is hard
    share: float = 0.0  # with sample: the share of the other inputs kept

    @classmethod
    def from_setting(cls, capture: str, margin: float) -> CapturePolicy:
        if capture.startswith("sample:"):
            return cls("sample", margin, float(capture.removeprefix("sample:")))
        return cls(capture, margin)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def reasons(self, unknown: np.ndarray, margins: np.ndarray) -> list[str | None]:
        """Why each image is kept (``unknown``, ``low_margin``, ``sample``), or None."""
        reasons: list[str | None] = []
        for flagged, margin in zip(unknown, margins, strict=True):
            if flagged:
                reasons.append("unknown")
            elif self.mode in ("hard", "sample") and margin < self.margin:
                reasons.append("low_margin")
            elif self.mode == "sample" and random.random() < self.share:
                reasons.append("sample")
            else:
                reasons.append(None)
        return reasons


# The file suffix of an image's bytes, from their first bytes (what Pillow reads).
_SIGNATURES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"))


def image_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _SIGNATURES if data.startswith(magic)), ".bin")


def png_bytes(pixels: np.ndarray) -> bytes:
    """An ``(H, W, C)`` uint8 model input as PNG (for inputs that came as tensors)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Entry:
    """One input to keep: its bytes as sent (or, for a tensor, its pixels, encoded as PNG by the
    writer), and the answer it got."""

    request_id: str
    answer: dict
    data: bytes | None = None
    pixels: np.ndarray | None = None

    def encoded(self) -> tuple[bytes, str]:
        if self.data is not None:
            return self.data, image_suffix(self.data)
        return png_bytes(np.asarray(self.pixels, dtype=np.uint8)), ".png"


def is_oversized(data: bytes) -> bool:
    """Whether encoded image bytes are far larger than the image they hold needs (read from
    its header only)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            pixels = image.width * image.height * len(image.getbands())
    except Exception:  # noqa: BLE001 - it was decoded once to be answered: not ours to judge
        return False
    return len(data) > OVERSIZE_FACTOR * pixels + OVERSIZE_ALLOWANCE


def disk_bytes(*paths: Path) -> int:
    """What ``paths`` take on disk (allocated blocks, not their lengths)."""
    return sum(os.stat(path).st_blocks * 512 for path in paths)


def entry_size(name: str) -> int:
    parsed = parse_entry_name(name)
    return parsed[1] if parsed else 0


def write_label(folder: Path, request_id: str, label: str) -> None:
    """The feedback label of a captured input, written atomically (the last one wins)."""
    labels = Path(folder) / LABELS_FOLDER
    labels.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=labels, prefix=".partial-", suffix=".json", delete=False
    ) as handle:
        json.dump({"request_id": request_id, "label": label, "at": time.time()}, handle)
    os.replace(handle.name, labels / f"{request_id}.json")


class CaptureStore:
    """One worker's writer into the capture folder: a list and a daemon thread.

    Args:
        on_written: ``(reason)`` after an entry is in place.
        on_evicted: ``(bytes)`` after an entry was evicted by this worker.
        on_dropped: ``()`` when the queue was full and an entry was dropped.
        on_refused: ``(reason)`` for an entry not kept: ``oversized``, ``write_failed``.
    """

    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        on_written,
        on_evicted,
        on_dropped,
        ledger=None,
        on_refused=lambda reason: None,
    ) -> None:
        self.folder = Path(folder)
        # With the prediction log on: the store's ledger in its database, which keeps the bound
        # across every replica's writers (service/store/capture_ledger.py); else each writer
        # counts the folder itself, as below.
        self.ledger = ledger
        self._ledger_failing = False
        self.max_bytes = max_bytes
        self.on_written, self.on_evicted, self.on_dropped = on_written, on_evicted, on_dropped
        self.on_refused = on_refused
        # Appended by requests; the writer thread removes each entry once it is written.
        self._pending: deque = deque()
        self._thread: threading.Thread | None = None
        self._size: int | None = None
        self._scanned_at = 0.0

    def submit(self, entry: Entry, reason: str) -> None:
        """Hand an entry to the writer thread; never blocks the request."""
        if self._thread is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
            self._thread.start()
        if len(self._pending) >= QUEUE_SIZE:
            self.on_dropped()
            return
        self._pending.append((entry, reason))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every entry handed over so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        self._sweep_partials()
        if self.ledger is not None:
            try:
                self.ledger.reconcile(lambda: {name: entry_size(name) for name in self.entries()})
            except Exception as error:  # the database is down: counted from the folder
                self._ledger_down(error)
        while True:
            time.sleep(WRITE_INTERVAL)
            while self._pending:
                entry, reason = self._pending[0]
                try:
                    if entry.data is not None and is_oversized(entry.data):
                        self.on_refused("oversized")
                        continue
                    name, size = self._write(entry)
                    if not self._admitted(name, size):
                        self._keep_within_bound(size)
                    self.on_written(reason)
                except OSError as error:  # a full or read-only volume: serving goes on
                    log.warning("capture: %s not written: %s", entry.request_id, error)
                    self.on_refused("write_failed")
                finally:
                    self._pending.popleft()

    def _write(self, entry: Entry) -> tuple[str, int]:
        """Write one entry under a partial name, then rename it into place; its name and
        bytes."""
        data, suffix = entry.encoded()
        written_at = time.time_ns()
        partial = self.folder / f"{PARTIAL_PREFIX}{written_at}-{entry.request_id}"
        partial.mkdir()
        try:
            (partial / f"{INPUT_STEM}{suffix}").write_bytes(data)
            answer = {**entry.answer, "request_id": entry.request_id, "captured_at": time.time()}
            (partial / ANSWER_FILE).write_text(json.dumps(answer))
            files = (partial, partial / f"{INPUT_STEM}{suffix}", partial / ANSWER_FILE)
            size = disk_bytes(*files)
            name = entry_name(written_at, size, entry.request_id)
            os.rename(partial, self.folder / name)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # a full volume: nothing half-written
            raise
        return name, size

    def _ledger_down(self, error: Exception) -> None:
        if not self._ledger_failing:
            log.warning("capture: the ledger is unavailable, counting the folder: %s", error)
        self._ledger_failing = True

    def _admitted(self, name: str, size: int) -> bool:
        """Admit the entry to the ledger and evict what it says; False without a ledger (or
        while its database is down)."""
        if self.ledger is None:
            return False
        try:
            evicted = self.ledger.admit(name, size)
        except Exception as error:
            self._ledger_down(error)
            return False
        self._ledger_failing = False
        for old, old_size in evicted:
            claimed = self.folder / f"{EVICTING_PREFIX}{old}"
            try:
                os.rename(self.folder / old, claimed)
            except FileNotFoundError:
                continue  # evicted by a writer counting the folder while the database was down
            shutil.rmtree(claimed, ignore_errors=True)
            self.on_evicted(old_size)
        return True

    def entries(self) -> list[str]:
        """The complete entries' names, oldest first."""
        with os.scandir(self.folder) as listing:
            return sorted(item.name for item in listing if parse_entry_name(item.name))

    def _keep_within_bound(self, added: int) -> None:
        now = time.monotonic()
        if self._size is None or now - self._scanned_at > RESCAN_SECONDS:
            names = self.entries()
            self._size = sum(entry_size(name) for name in names)
            self._scanned_at = now
        else:
            self._size += added
            if self._size <= self.max_bytes:
                return
            names = self.entries()
            self._size = sum(entry_size(name) for name in names)
        for name in names:
            if self._size <= self.max_bytes:
                break
            claimed = self.folder / f"{EVICTING_PREFIX}{name}"
            try:
                os.rename(self.folder / name, claimed)  # atomic: one worker wins each entry
            except FileNotFoundError:
                continue  # another worker evicted it
            shutil.rmtree(claimed, ignore_errors=True)
            self._size -= entry_size(name)
            self.on_evicted(entry_size(name))

    def _sweep_partials(self) -> None:
        """Remove what processes that died while writing or evicting left behind: entries, and
        label files."""
        cutoff = time.time() - STALE_PARTIAL_SECONDS
        labels = self.folder / LABELS_FOLDER
        if labels.is_dir():
            with os.scandir(labels) as listing:
                for item in listing:
                    try:
                        if item.name.startswith(PARTIAL_PREFIX) and item.stat().st_mtime < cutoff:
                            os.unlink(item.path)
                    except FileNotFoundError:
                        continue
        with os.scandir(self.folder) as listing:
            for item in listing:
                if item.name.startswith((PARTIAL_PREFIX, EVICTING_PREFIX)):
                    try:
                        stale = item.stat().st_mtime < cutoff or item.name.startswith(
                            EVICTING_PREFIX
                        )
                    except FileNotFoundError:
                        continue
                    if stale:
                        shutil.rmtree(item.path, ignore_errors=True)
