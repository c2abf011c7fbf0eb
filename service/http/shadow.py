"""A challenger in the shadow of the served model (``SHADOW_MODEL``), beside each API worker.

A share ``SHADOW_SHARE`` of the answered requests also goes to the challenger, with the same
preprocessed pixels, after the caller has been answered by the champion: the caller only ever
gets the champion's answer. The challenger's answers are compared with the champion's
(agreement, its unknown rate, its scores: the metrics) and written to the prediction log under
the same request ids (``shadow_predictions``), where the labels that come back later judge both
(``python -m training rollout``).

**It costs only spare capacity, and is shed first.** The challenger runs in a process of its
own, started by the worker, at the lowest CPU priority (nice 19: the kernel gives it a core only
when the serving processes leave one idle), on one onnxruntime thread, fed from a queue of
``SHADOW_QUEUE`` requests. A thread of the worker would share its interpreter lock, and a
low-priority thread descheduled while holding it stalled the requests (measured: 15% on the p50,
BENCHMARKS.md). When the machine is busy the queue fills, and the requests that find it full are
not shadowed (``classifier_shadow_shed_total``): the champion's requests never wait for it. The
process ends with its worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import random
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy.engine import make_url

from service.core.classifier import Classifier, ModelLoadError
from service.core.postprocessing import Answers
from service.http.metrics import get_metrics
from service.registry.model_store import locate_model
from service.registry.watch import load_checked
from service.store.log import PredictionLog

log = logging.getLogger("service")

# Requests waiting for the challenger in a worker, at most; past it, new ones are shed.
SHADOW_QUEUE = 8
# The challenger process's niceness: the lowest CPU priority.
LOWEST_PRIORITY = 19
# How often the challenger process checks that its worker is still there.
PARENT_CHECK_SECONDS = 1.0


def shadow_source(reference: str):
    """``SHADOW_MODEL``: an artifact folder when it names one (a path), else a model-store tag."""
    if "/" in reference or reference.startswith("."):
        return locate_model(model_path=reference)
    return locate_model(model_tag=reference)


def load_challenger(reference: str, champion_spec) -> Classifier:
    """The challenger ``reference`` names, checked as a served model is, and on the champion's
    input: the same preprocessed pixels go to both.

    Raises:
        ModelLoadError: it cannot be served, or it takes another input.
    """
    challenger = load_checked(shadow_source(reference), threads=1)
    if challenger.spec != champion_spec:
        raise ModelLoadError(
            f"SHADOW_MODEL={reference}: it takes {challenger.spec.shape} inputs and the served "
            f"model {champion_spec.shape}; a shadow runs on the served model's preprocessed input"
        )
    return challenger


@dataclass(frozen=True)
class LogSettings:
    """Where the challenger's process writes its rows: the worker's prediction log."""

    url: str  # the database URL as SQLAlchemy renders it, with its password
    retention_seconds: float
    buffer_rows: int


@dataclass(frozen=True)
class _Job:
    pixels: np.ndarray  # (N, H, W, C) as the champion saw them
    verdicts: tuple[str, ...]  # the champion's, per image
    request_ids: tuple[str, ...]
    champion_version: str


class Shadow:
    """The worker's side: offers a share of what the champion answered to the challenger's
    process, never waiting for it.

    Args:
        challenger: the model in the shadow, loaded and checked here (the process loads it
            again; this copy is only for its identity).
        reference: ``SHADOW_MODEL`` as set.
        share: the share of requests shadowed, 0 to 1.
        log: where the process writes its rows, or None (no prediction log).
    """

    def __init__(
        self, challenger: Classifier, reference: str, share: float, log: LogSettings | None
    ) -> None:
        self.folder, self.share = challenger.folder, share
        self.metrics = get_metrics()
        self._random = random.Random()
        context = multiprocessing.get_context("spawn")  # a fork would copy the worker's threads
        self._jobs = context.Queue(SHADOW_QUEUE)
        self.process = context.Process(
            target=serve_challenger,
            args=(self._jobs, reference, os.getpid(), log),
            name="shadow",
            daemon=True,
        )
        self.process.start()

    def offer(self, pixels: np.ndarray, champion: Answers, served: Classifier) -> None:
        """Shadow this request, if it falls in the share and the queue has room; never blocks.
        A champion that is the challenger (it was promoted) is not compared with itself."""
        if served.folder == self.folder or self._random.random() >= self.share:
            return
        verdicts = tuple(champion.predictions.verdicts(champion.contract.labels))
        job = _Job(pixels, verdicts, champion.request_ids, champion.contract.version)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.metrics.shadow_shed.inc(len(champion))


def serve_challenger(jobs, reference: str, parent: int, log_settings: LogSettings | None) -> None:
    """The challenger's process: load it, then answer each job until the worker is gone."""
    with contextlib.suppress(OSError):
        os.nice(LOWEST_PRIORITY)
    try:
        challenger = load_checked(shadow_source(reference), threads=1)
    except ModelLoadError as error:
        log.warning("shadow off: %s", error)
        return
    writer = None
    if log_settings is not None:
        writer = PredictionLog(
            make_url(log_settings.url),
            log_settings.retention_seconds,
            buffer_rows=log_settings.buffer_rows,
            maintain=False,  # claims are the workers' to count
        )
    metrics = get_metrics()
    metrics.shadow_info.labels(challenger.name, challenger.version).set(1)
    while os.getppid() == parent:
        try:
            job = jobs.get(timeout=PARENT_CHECK_SECONDS)
        except queue.Empty:
            continue
        try:
            compare(challenger, job, metrics, writer)
        except Exception:  # one bad job must not end the shadow
            log.exception("shadow: the challenger failed on a request; it goes on")
    if writer is not None:
        writer.close()


def compare(challenger: Classifier, job: _Job, metrics, writer) -> None:
    """The challenger's answers to one job: counted against the champion's, and logged."""
    answers = challenger.classify(job.pixels, 1, True, job.request_ids)
    verdicts = answers.predictions.verdicts(answers.contract.labels)
    scores = answers.predictions.probabilities.max(axis=1)
    for verdict, other, score in zip(verdicts, job.verdicts, scores, strict=True):
        metrics.shadow_predictions.labels(str(verdict == other).lower()).inc()
        metrics.shadow_score.observe(float(score))
    metrics.shadow_unknown.inc(int(np.count_nonzero(answers.predictions.unknown)))
    if writer is None:
        return
    now, contract = time.time(), answers.contract
    ood = answers.predictions.ood_scores
    writer.submit_shadow(
        [
            {
                "request_id": request_id,
                "model_version": contract.version,
                "at": now,
                "model_name": contract.name,
                "champion_version": job.champion_version,
                "predicted": answers.ranked[position][0]["label"],
                "verdict": verdicts[position],
                "score": float(answers.ranked[position][0]["score"]),
                "ood_score": None if ood is None else float(ood[position]),
            }
            for position, request_id in enumerate(job.request_ids)
        ]
    )
