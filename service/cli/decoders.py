"""Decoding and preprocessing ahead of onnxruntime, in a pool of processes: the offline CLI's
way to keep every core busy (onnxruntime's own threads only contended with decoding, measured in
BENCHMARKS.md). Files that cannot be read become rows with an error, not failures of the run."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from service.core.preprocessing import ImageError, ImageSpec, preprocess_bytes

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
