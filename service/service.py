"""BentoML's entry point: ``bentoml serve service.service:ImageClassifier``.

- ``ImageClassifier`` (``WORKERS`` processes) takes HTTP requests and runs each through the
  request pipeline (:mod:`service.http.pipeline`): the training job's own preprocessing, the
  model, and answers.
- With adaptive batching on (``BATCHING=auto`` turns it on only for a model whose batches pay,
  :mod:`service.http.adaptive_batching`), ``OnnxModel`` (``MODEL_WORKERS`` processes) runs
  onnxruntime instead, so that concurrent requests share one onnxruntime call.

BentoML imports this module in every process and reads its decorators' arguments then, so the
one start-up call below (:func:`service.http.app.start`) runs at import: the settings and the
batching decision. The classes only declare the services; the work is in :mod:`service.http`.
"""

from __future__ import annotations

import bentoml
import numpy as np

from service.http import app, protocol
from service.http.metrics import get_metrics
from service.http.pipeline import run_model

STARTUP = app.start()
SETTINGS = STARTUP.settings
protocol.install(
    SETTINGS.max_header_bytes, SETTINGS.max_header_count, SETTINGS.header_timeout_seconds
)
# BentoML's own request timeout, past the service's (service/http/middleware.py, which answers
# a 504 in the API's JSON shape): a backstop only.
TIMEOUT_BACKSTOP_SECONDS = 5
# Every path excluded from OpenTelemetry's middleware (the pattern matches any URL).
UNTRACED = {"excluded_urls": [".*"]}
# BentoML's own traffic metrics off: its middleware wraps every request a second time. The
# service counts requests and their durations itself (classifier_requests_total,
# classifier_request_duration_seconds) and serves /metrics from its own route.
NO_BENTOML_METRICS = {"enabled": False}


@bentoml.service(
    name="onnx_model",
    workers=SETTINGS.model_workers,
    traffic={"timeout": SETTINGS.request_timeout_seconds + TIMEOUT_BACKSTOP_SECONDS},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={} if SETTINGS.tracing else UNTRACED,
    metrics=NO_BENTOML_METRICS,
    # Callers keep their pooled connection: BentoML 1.4.40 otherwise replaces it every 100 calls
    # and closes the old one under calls still in flight ("Connector is closed" under load).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 365 * 24 * 3600.0},
)
class OnnxModel:
    """onnxruntime over batches of preprocessed images."""

    def __init__(self) -> None:
        threads = SETTINGS.onnx_threads(SETTINGS.model_workers)
        self.classifier = app.load_worker_model(SETTINGS, threads)
        self.metrics = get_metrics()
        app.freeze_startup_objects()

    @bentoml.api(
        batchable=STARTUP.batching,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.batch_max_latency_ms,
    )
    def logits(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, C)`` raw pixels -> one ``(N, K[+1][+h*w])`` float32 array: the logits,
        then the unknown-input score when the model has a detector and the flattened class
        activation map when it has one (``ModelOutputs.stacked``)."""
        return run_model(self.classifier, images, self.metrics).stacked()


@bentoml.service(
    name="image_classifier",
    workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.request_timeout_seconds + TIMEOUT_BACKSTOP_SECONDS},
    logging={"access": {"enabled": SETTINGS.access_log}},
    tracing={} if SETTINGS.tracing else UNTRACED,
    metrics=NO_BENTOML_METRICS,
)
@bentoml.asgi_app(STARTUP.api, path="/")
class ImageClassifier:
    """The HTTP API: /classify, /classify_batch and the Open Inference Protocol under /v2."""

    if STARTUP.batching:
        # Inference goes to the OnnxModel service, which gathers concurrent calls into batches.
        onnx_model = bentoml.depends(OnnxModel)

    @bentoml.on_deployment
    def check_model() -> None:
        """Once, in the serving process, before any worker starts: an unservable model stops
        ``bentoml serve`` with one line (exit status 2)."""
        app.refuse_unservable_model(STARTUP)

    def __init__(self) -> None:
        # Without batching this worker also runs onnxruntime, with its share of the CPUs.
        threads = 1 if STARTUP.batching else SETTINGS.onnx_threads(SETTINGS.api_workers)
        classifier = app.load_worker_model(SETTINGS, threads)
        app.serve_on(
            STARTUP, classifier, self._remote_logits if STARTUP.batching else None, threads
        )
        app.freeze_startup_objects()

    async def _remote_logits(self, images: np.ndarray) -> np.ndarray:
        # BentoML's client for the model service sets up its methods when first called, so
        # the method is looked up per call.
        return await self.onnx_model.to_async.logits(images)


app.add_middleware(ImageClassifier, STARTUP)
