"""The service's start-up and assembly: settings, the adaptive-batching decision, the one-line
refusal of a model that cannot be served, the FastAPI app with its routes and error handlers,
the middleware, and each worker's model.

:func:`start` is the start-up. BentoML's entry module (:mod:`service.service`) calls it once per
process, because BentoML's decorators need its answers (worker counts, batching) when the
module is imported; nothing else in the service does work at import.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from service.core.classifier import Classifier, ModelLoadError
from service.http import adaptive_batching, decoding, feedback, model_swap, oip_routes, routes
from service.http import shadow as shadows
from service.http.adaptive_batching import ModelCost
from service.http.capture import CaptureStore, write_label
from service.http.drift import DriftMonitor
from service.http.errors import install_error_handlers
from service.http.fast_path import FastPath
from service.http.metrics import get_metrics, record_error, record_model_loaded, record_request
from service.http.middleware import ServiceMiddleware
from service.http.pipeline import ClassificationService, RemoteModel
from service.http.settings import BATCHING_AUTO, BATCHING_ON, ServiceSettings
from service.registry.model_store import locate_model
from service.registry.watch import SourceWatch, load_checked
from service.store.capture_ledger import CaptureLedger
from service.store.database import database_url
from service.store.log import PredictionLog

log = logging.getLogger("service")
# Start-up lines of the serving process, whose logging is not set up yet when they are printed.
LOG = {"file": sys.stderr, "flush": True}


@dataclass
class Startup:
    """What the start-up of one process decided, for the service declarations to use."""

    settings: ServiceSettings
    batching: bool  # onnxruntime behind BentoML's adaptive batching
    batching_status: dict  # the decision as GET /model shows it
    api: FastAPI
    # In the ``bentoml serve`` process with BATCHING=auto: the model as start-up loaded it to
    # time it, or why it could not; the deployment check uses it instead of loading again.
    loaded: Classifier | ModelLoadError | None = None


def start(environ: MutableMapping[str, str] = os.environ) -> Startup:
    """Read the settings and decide adaptive batching, once per process.

    With ``BATCHING=auto``, the first process (``bentoml serve``) loads the model, times it,
    decides, and writes the decision to ``environ`` for the workers it starts, which then read it
    without measuring (:mod:`service.http.adaptive_batching`).
    """
    settings = ServiceSettings.from_env(environ)
    cost = adaptive_batching.measured_cost(environ)
    loaded: Classifier | ModelLoadError | None = None
    if settings.batching == BATCHING_AUTO:
        loaded, cost = _load_and_time(settings)
        enabled = cost is not None and adaptive_batching.choose(cost)
        adaptive_batching.hand_down(enabled, cost, environ)
    else:
        enabled = settings.batching == BATCHING_ON
    return Startup(
        settings=settings,
        batching=enabled,
        batching_status=adaptive_batching.batching_status(settings.batching, enabled, cost),
        api=build_api(),
        loaded=loaded,
    )


def _load_and_time(
    settings: ServiceSettings,
) -> tuple[Classifier | ModelLoadError, ModelCost | None]:
    """The model, loaded with an API worker's threads, and its cost; a model that cannot be
    loaded or timed leaves batching off (the deployment check then refuses one that cannot be
    loaded). Its one line goes to the serving log (the logging of this process is not set up
    yet)."""

    def off(reason: Exception) -> None:
        print(f"BATCHING=auto: the model could not be timed ({reason}); batching off", **LOG)

    try:
        threads = settings.onnx_threads(settings.api_workers)
        classifier = load_worker_model(settings, threads, record=False)
    except ModelLoadError as error:
        off(error)
        return error, None
    try:
        cost = adaptive_batching.measure(classifier)
    except Exception as error:  # onnxruntime raises several private exception types
        off(error)
        return classifier, None
    print(adaptive_batching.decision_line(cost, adaptive_batching.choose(cost)), **LOG)
    return classifier, cost


def build_api() -> FastAPI:
    """The FastAPI app: the routes, the Open Inference Protocol and the JSON error handlers."""
    api = FastAPI(
        title="Image classifier",
        description="Classify images with an ONNX model; Open Inference Protocol under /v2.",
    )
    install_error_handlers(api)
    api.include_router(routes.router)
    api.include_router(oip_routes.router)
    api.include_router(feedback.router)
    api.include_router(model_swap.router)
    return api


def refuse_unservable_model(startup: Startup) -> None:
    """Once, in the ``bentoml serve`` process, before any worker starts: a model that cannot be
    served stops the server with one line naming the problem (exit status 2), instead of workers
    failing and restarting forever. The model start-up already loaded is not loaded again."""
    loaded, startup.loaded = startup.loaded, None  # the workers load their own
    try:
        if isinstance(loaded, ModelLoadError):
            raise loaded
        if loaded is None:
            load_worker_model(startup.settings, 1, record=False)
    except ModelLoadError as error:
        print(f"error: cannot serve: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def load_worker_model(settings: ServiceSettings, threads: int, record: bool = True) -> Classifier:
    """The served model, on ``threads`` onnxruntime threads, checked (its contract, its
    signature and one inference: the checks a swapped-in version passes too); with ``record``,
    its identity and load time are published in the metrics."""
    started = time.perf_counter()
    source = locate_model(settings.model_path, settings.model_reference)
    classifier = load_checked(source, threads)
    if record:
        record_model_loaded(classifier.contract, time.perf_counter() - started)
        log.info("model %s loaded, %d onnxruntime threads", classifier.source, threads)
    return classifier


def serve_on(
    startup: Startup,
    classifier: Classifier,
    remote_model: RemoteModel | None = None,
    threads: int = 1,
) -> ClassificationService:
    """Put this worker's :class:`ClassificationService` on the app, where the routes' typed
    dependency finds it, and, when this worker runs the model itself, the watch that swaps in
    new versions (``threads``: the onnxruntime threads a new version gets)."""
    settings = startup.settings
    decoding.keep_memory_returnable()
    decoding.quiet_pillow()
    state = startup.api.state
    writer = None
    if settings.prediction_log_enabled:
        writer = prediction_log(settings, lambda: state.classification_service.classifier.labels)
    service = ClassificationService(
        classifier,
        settings,
        startup.batching_status,
        remote_model,
        log=writer,
        capture=capture_store(settings, writer) if settings.capture != "off" else None,
        shadow=challenger(settings, classifier, writer) if settings.shadow_model else None,
        drift=drift_monitor(settings),
    )
    state.classification_service = service
    if remote_model is None:
        source = (settings.model_path, settings.model_reference)
        watch = SourceWatch(*source, threads, classifier.folder)
        state.model_swapper = model_swap.ModelSwapper(service, watch, settings.model_watch_seconds)
        state.model_swapper.start()
    return service


def drift_monitor(settings: ServiceSettings) -> DriftMonitor | None:
    """This worker's drift checks, or None with ``DRIFT_WINDOW=0`` (the metrics say "not
    available")."""
    if settings.drift_window <= 0:
        get_metrics().drift_available.set(0)
        return None
    return DriftMonitor(settings.drift_window, settings.drift_alpha)


def challenger(
    settings: ServiceSettings, champion: Classifier, writer: PredictionLog | None
) -> shadows.Shadow | None:
    """The ``SHADOW_MODEL`` challenger of this worker, in a process of its own; one that cannot
    be served on the champion's input is left out, in one line: the served model serves either
    way."""
    try:
        model = shadows.load_challenger(settings.shadow_model, champion.spec)
    except ModelLoadError as error:
        log.warning("shadow off: %s", error)
        return None
    log.info(
        "shadow: %s version %s gets %g of the requests", model.name, model.version,
        settings.shadow_share,
    )  # fmt: skip
    log_settings = None
    if writer is not None:
        url = writer.url.render_as_string(hide_password=False)
        log_settings = shadows.LogSettings(
            url, settings.feedback_retention_seconds, settings.prediction_log_buffer
        )
    return shadows.Shadow(model, settings.shadow_model, settings.shadow_share, log_settings)


def prediction_log(settings: ServiceSettings, labels: Callable[[], list[str]]) -> PredictionLog:
    """This worker's writer into the prediction log (``DATABASE_URL``, else the SQLite file in
    ``FEEDBACK_DIR``), counting what it writes, drops and claims; what waits is written when the
    worker exits. ``labels``: the classes of the model served now."""
    metrics = get_metrics()
    folder = settings.feedback_dir or Path(tempfile.gettempdir()) / "image-classifier-records"

    def claimed(claims) -> None:
        known = set(labels())
        for claim in claims:
            feedback.count(metrics, claim, known)
            if claim.captured:
                try:
                    write_label(Path(settings.capture_dir), claim.request_id, claim.label)
                except OSError as error:
                    # The label is in the log already; a full volume only loses its copy here.
                    log.warning("capture: label of %s not written: %s", claim.request_id, error)
                    metrics.capture_refused.labels("write_failed").inc()

    prediction_log = PredictionLog(
        database_url(settings.database_url, Path(folder)),
        settings.feedback_retention_seconds,
        buffer_rows=settings.prediction_log_buffer,
        on_claimed=claimed,
        on_written=metrics.log_written.inc,
        on_dropped=metrics.log_dropped.inc,
        on_orphaned=metrics.feedback_orphaned.inc,
        on_failed=metrics.log_failures.inc,
    )
    atexit.register(prediction_log.close)
    return prediction_log


def capture_store(settings: ServiceSettings, log: PredictionLog | None = None) -> CaptureStore:
    """This worker's writer into ``CAPTURE_DIR``, counting what it writes, evicts and drops;
    with the prediction log on, its database's ledger keeps the bound across replicas."""
    metrics = get_metrics()

    def evicted(size: int) -> None:
        metrics.capture_evicted.inc()
        metrics.capture_evicted_bytes.inc(size)

    return CaptureStore(
        Path(settings.capture_dir),
        settings.capture_max_bytes,
        on_written=lambda reason: metrics.captured.labels(reason).inc(),
        on_evicted=evicted,
        on_dropped=metrics.capture_dropped.inc,
        on_refused=lambda reason: metrics.capture_refused.labels(reason).inc(),
        ledger=None
        if log is None
        else CaptureLedger(log, settings.capture_dir, settings.capture_max_bytes),
    )


def add_middleware(service_class, startup: Startup) -> None:
    """The service's one ASGI middleware (:mod:`service.http.middleware`): request metrics, the
    JSON shape of every error, the body limit, the request timeout, connection recycling, and
    the hot routes answered without the mounted app's stack (:mod:`service.http.fast_path`)."""
    settings = startup.settings
    service_class.add_asgi_middleware(
        ServiceMiddleware,
        fast_path=FastPath(startup.api) if settings.fast_path else None,
        observe=record_request,
        count_error=record_error,
        max_bytes=settings.max_request_bytes,
        max_requests=settings.max_requests_per_connection,
        timeout_seconds=settings.request_timeout_seconds,
    )


def freeze_startup_objects() -> None:
    """Move everything built at start-up (the imported libraries, the model) out of the garbage
    collector's reach. A full collection otherwise scans those 100,000+ objects again and again,
    stopping the worker for about 75 ms each time: the periodic stall behind the p99 latency
    (BENCHMARKS.md). Request objects are still collected as before."""
    gc.collect()
    gc.freeze()
