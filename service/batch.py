"""Batch inference at scale: shards chosen by a stable hash with no coordination, part files that
are written as rows are produced and renamed into place only when complete, and the merge of a
run's parts into one file.

N processes, on one machine or N pods of a Kubernetes Indexed Job, each run
``python -m service.predict INPUTS --shard I/N --output FOLDER``: each keeps the files whose
stable hash (of the path relative to its input root) falls in shard I, so together they classify
every file exactly once. Then ``python -m service.predict merge FOLDER --output FILE``.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.preprocessing import ImageError, ImageSpec, preprocess_bytes

PART_FORMATS = ("csv", "jsonl")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PART_NAME = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")


class BatchError(ValueError):
    """A sharding, resume or merge problem; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), as ``--shard index/count`` names it."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(text)
        if not match or not int(match[1]) < int(match[2]):
            raise BatchError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 3/10")
        return cls(int(match[1]), int(match[2]))

    def holds(self, key: str) -> bool:
        """Whether the file of ``key`` (its path relative to its input root) is in this shard:
        the same answer on every machine and every run."""
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class PartFiles:
    """Where one shard writes: rows under a temporary name while it runs, renamed when complete,
    and a summary beside them, written last (the mark of a complete part)."""

    final: Path
    partial: Path
    summary: Path | None

    @classmethod
    def for_shard(cls, folder: Path, shard: Shard, suffix: str) -> PartFiles:
        return cls(
            folder / f"{shard.name}.{suffix}",
            folder / f".{shard.name}.{suffix}.partial",
            folder / f"{shard.name}.json",
        )

    @classmethod
    def for_file(cls, path: Path) -> PartFiles:
        return cls(path, path.with_name(f".{path.name}.partial"), None)


def complete_lines(path: Path) -> None:
    """Cut a partial file back to its last complete line (a kill can leave half a row)."""
    with path.open("rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)


def read_rows(path: Path, fmt: str) -> Iterator[dict]:
    """The rows of a part or partial file, as dicts (CSV values are strings)."""
    with path.open(newline="") as handle:
        if fmt == "csv":
            yield from csv.DictReader(handle)
        else:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def write_summary(path: Path, summary: dict) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, path)


def find_parts(folder: Path) -> tuple[int, dict[int, dict]]:
    """The shard count of the parts in ``folder`` and each complete part's summary, by index.

    Raises:
        BatchError: no part, or parts of different shard counts.
    """
    summaries, counts = {}, set()
    for path in sorted(folder.glob("part-*-of-*.json")):
        match = _PART_NAME.match(path.name)
        if match:
            counts.add(int(match[2]))
            summaries[int(match[1])] = json.loads(path.read_text())
    if not counts:
        raise BatchError(f"{folder} holds no complete part (part-IIIII-of-NNNNN.json)")
    if len(counts) > 1:
        raise BatchError(f"{folder} mixes parts of {sorted(counts)} shards: one run per folder")
    return counts.pop(), summaries


def check_parts(folder: Path) -> dict[int, dict]:
    """Every shard's summary, by index, once each part is known to exist, be complete and come
    from the same model.

    Raises:
        BatchError: a part is missing or incomplete (named), or the parts disagree.
    """
    count, summaries = find_parts(folder)
    missing = [index for index in range(count) if index not in summaries]
    if missing:
        named = ", ".join(f"{index}/{count}" for index in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise BatchError(
            f"{len(missing)} of {count} shards missing or incomplete in {folder}: {named}{more}; "
            "run them (again with --resume) before merging"
        )
    models = {json.dumps(summary["model"], sort_keys=True) for summary in summaries.values()}
    if len(models) > 1:
        raise BatchError(f"the parts in {folder} come from different models: {sorted(models)}")
    return summaries


def merged_rows(folder: Path, summaries: dict[int, dict]) -> Iterator[dict]:
    """All parts' rows in path order, streaming: each part is sorted, so memory stays flat."""
    streams = [
        read_rows(folder / summary["file"], summary["format"])
        for _, summary in sorted(summaries.items())
    ]
    return heapq.merge(*streams, key=lambda row: row["path"])


# --- decoding in a pool of processes ---------------------------------------------------------

# Images per task sent to a decoding process: large enough that the hand-off is cheap, small
# enough that every process has work within a batch.
DECODE_TASK_FILES = 16
# Batches decoded ahead of the one onnxruntime is running.
LOOKAHEAD_BATCHES = 2
PR_SET_PDEATHSIG = 1
_SPEC = None
_MAX_PIXELS = 0


def _start_decoder(spec: dict, max_pixels: int) -> None:
    """In each decoding process: the spec, and signals left to the parent, which stops the run
    (SIGTERM after the batch in progress; Ctrl-C reaches the whole process group)."""
    global _SPEC, _MAX_PIXELS
    _SPEC, _MAX_PIXELS = ImageSpec.from_dict(spec), max_pixels
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (PR_SET_PDEATHSIG), so that a parent
    killed outright (SIGKILL, out of memory) leaves no decoder behind."""
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(0)


# A decoded file: (model input, None), or (None, the error its row records).
Decoded = tuple[np.ndarray | None, str | None]


def decode_file(path: str, spec: ImageSpec, max_pixels: int) -> Decoded:
    """One file -> (model input, None), or (None, the error a row records)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, f"unreadable: {error}"
    try:
        return preprocess_bytes(data, spec, max_pixels), None
    except ImageError as error:
        return None, f"{error.code}: {error.detail}"


def _decode_files(paths: list[str]) -> list[Decoded]:
    return [decode_file(path, _SPEC, _MAX_PIXELS) for path in paths]


def decoded_batches(
    paths: list[Path], spec: ImageSpec, batch_size: int, processes: int, max_pixels: int
) -> Iterator[tuple[list[Path], list[Decoded]]]:
    """``(batch of paths, their decoded inputs or errors)``, batch after batch, in order.

    With ``processes`` > 1, decoding and preprocessing run in that many processes (started
    fresh: a fork would copy onnxruntime's threads), a few batches ahead of the caller, who runs
    the model meanwhile; memory stays bounded by the look-ahead.
    """
    starts = iter(range(0, len(paths), batch_size))
    if processes <= 1 or len(paths) <= batch_size:
        for start in starts:
            batch = paths[start : start + batch_size]
            yield batch, [decode_file(str(path), spec, max_pixels) for path in batch]
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        processes,
        mp_context=context,
        initializer=_start_decoder,
        initargs=(spec.to_dict(), max_pixels),
    ) as pool:
        pending: deque = deque()

        def submit(start: int) -> None:
            batch = paths[start : start + batch_size]
            tasks = [
                pool.submit(_decode_files, [str(path) for path in batch[i : i + DECODE_TASK_FILES]])
                for i in range(0, len(batch), DECODE_TASK_FILES)
            ]
            pending.append((batch, tasks))

        for start in itertools.islice(starts, LOOKAHEAD_BATCHES + 1):
            submit(start)
        while pending:
            batch, tasks = pending.popleft()
            results = [result for task in tasks for result in task.result()]
            following = next(starts, None)
            if following is not None:
                submit(following)
            yield batch, results
