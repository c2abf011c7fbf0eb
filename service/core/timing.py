"""The one way this project times a call: the median of repeated runs after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs, after ``warmup`` untimed runs
    (first calls build graphs, caches and thread pools)."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))
