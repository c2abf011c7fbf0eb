"""Drift checks in each API worker: its window of the last ``DRIFT_WINDOW`` answered images,
tested against the reference shipped with the served model (:mod:`service.core.drift`).

On the request path, an answer's calibrated scores and unknown-input scores are copied into the
window (a few microseconds, under a lock). When the window is full it is handed to the worker's
checker thread and a new one starts: consecutive windows do not overlap, so each is one test
with at most ``DRIFT_ALPHA`` chance of a false alarm. The checker sets the metrics
(``classifier_drift_*``, ``classifier_estimated_accuracy``) and logs a line on drift. If it is
still busy when the next window fills, that window is skipped and counted, never queued: the
requests never wait for it.

**Per worker, not over all replicas.** A plain Service spreads requests over the pods at random,
so each worker's window is a random sample of the same stream, with the same power to detect a
shift as a window of the same size gathered over all replicas; what differs is only how soon a
worker fills its window (BENCHMARKS.md measures the checks' cost; the shared prediction log
holds the global view, which ``python -m training drift --database`` reads). A window over the
log would need the database on every check and the full scores in every row, for no more
power. A new model version starts a new window.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np

from service.core.classifier import Classifier
from service.core.drift import ESTIMATORS, TESTS, check_window
from service.core.postprocessing import Predictions
from service.http.metrics import get_metrics

log = logging.getLogger("service")


class DriftMonitor:
    """One worker's window and checker thread."""

    def __init__(self, window: int, alpha: float) -> None:
        self.window = window
        self.alpha = alpha
        self.metrics = get_metrics()
        self._lock = threading.Lock()
        self._version: str | None = None
        self._reference = None
        self._scores: np.ndarray | None = None
        self._ood: np.ndarray | None = None
        self._filled = 0
        self._pending: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self.last: dict | None = None  # the latest check, as GET /model shows it

    def describe(self, classifier: Classifier) -> dict:
        """The drift section of ``GET /model``."""
        if classifier.drift is None:
            return {"available": False, "why": classifier.drift_unavailable}
        return {
            "available": True,
            "window": self.window,
            "alpha": self.alpha,
            "reference_images": classifier.drift.size,
            "filled": self._filled,
            "last": self.last,
        }

    def offer(self, predictions: Predictions, classifier: Classifier) -> None:
        """Add answered images to the window; hand it to the checker when full."""
        reference = classifier.drift
        version = classifier.version
        with self._lock:
            if version != self._version:
                self._start_version(version, reference, classifier)
            if reference is None:
                return
            scores, ood = predictions.probabilities, predictions.ood_scores
            position = 0
            while position < len(scores):
                room = min(self.window - self._filled, len(scores) - position)
                end = self._filled + room
                self._scores[self._filled : end] = scores[position : position + room]
                if ood is not None:
                    self._ood[self._filled : end] = ood[position : position + room]
                self._filled, position = end, position + room
                if self._filled == self.window:
                    self._hand_over(ood is not None)

    def _start_version(self, version: str, reference, classifier: Classifier) -> None:
        self._version, self._reference, self._filled = version, reference, 0
        self.last = None
        self.metrics.drift_available.set(0 if reference is None else 1)
        if reference is None:
            log.info("drift checks not available: %s", classifier.drift_unavailable)
            return
        self.metrics.drift_window_images.set(self.window)
        for verdict in ("drift", "no_drift"):  # both series from 0, so increase() counts the first
            self.metrics.drift_windows.labels(verdict)
        self._scores = np.empty((self.window, reference.num_classes), dtype=np.float32)
        self._ood = np.empty(self.window, dtype=np.float32)

    def _hand_over(self, with_ood: bool) -> None:
        window = (self._reference, self._version, self._scores, self._ood if with_ood else None)
        try:
            self._pending.put_nowait(window)
        except queue.Full:
            self.metrics.drift_skipped.inc()
        else:
            # The checker owns these arrays now; the next window gets new ones.
            self._scores = np.empty_like(self._scores)
            self._ood = np.empty_like(self._ood)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
                self._thread.start()
        self._filled = 0

    def _run(self) -> None:
        while True:
            reference, version, scores, ood = self._pending.get()
            try:
                self._check(reference, version, scores, ood)
            except Exception:  # a check must never stop the checker
                log.exception("drift check failed")

    def _check(self, reference, version: str, scores: np.ndarray, ood) -> None:
        started = time.perf_counter()
        result = check_window(reference, scores, ood, self.alpha)
        seconds = time.perf_counter() - started
        metrics = self.metrics
        metrics.drift_check_seconds.observe(seconds)
        for test in TESTS:
            if test in result.p_values:
                metrics.drift_p_value.labels(test).set(result.p_values[test])
        for method in ESTIMATORS:
            metrics.estimated_accuracy.labels(method).set(result.estimates[method])
        metrics.drift_detected.set(1 if result.drifted else 0)
        metrics.drift_windows.labels("drift" if result.drifted else "no_drift").inc()
        self.last = {"version": version, **result.to_dict()}
        if result.drifted:
            log.warning(
                "drift: a window of %d images differs from the reference (%s); estimated "
                "accuracy %.3f (ATC)", result.size, ", ".join(
                    f"{name} p={result.p_values[name]:.2g}" for name in result.tests_fired()
                ), result.estimates["atc"],
            )  # fmt: skip
