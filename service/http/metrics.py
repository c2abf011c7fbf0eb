"""The model's own Prometheus metrics, defined once, correct across BentoML's worker processes.

BentoML runs several worker processes and answers ``/metrics`` from whichever one takes the
scrape, reading prometheus-client's multiprocess files. A metric only lands in those files if
``prometheus_client`` was first imported after BentoML set ``PROMETHEUS_MULTIPROC_DIR`` in the
worker (BentoML issue #5056), so this module imports it lazily, on the first :func:`get_metrics`
call made inside a worker, never at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from service.core.contract import ModelContract
from service.core.postprocessing import Predictions
from service.http.drift_metrics import drift_metrics
from service.http.endpoints import endpoint_label

# Top-1 probability: 0.1 .. 1.0, so a falling median shows input drift.
SCORE_BUCKETS = tuple(round(0.1 * step, 1) for step in range(1, 11))
# Seconds of one step (one image's decode + preprocess, one onnxruntime call, one batch's
# softmax and top-k): 50 us .. 2.5 s.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
# Unknown-input score over its threshold: 1 is the line between known and unknown.
OOD_RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
# The ``actual`` label of replaced feedback that named a class the model does not know.
NEW_CLASS = "(new class)"
# Images per onnxruntime call.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Metrics:
    predictions: object  # Counter{model, version, label}
    prediction_score: object  # Histogram
    ood_score_ratio: object  # Histogram
    inference_seconds: object  # Histogram
    preprocess_seconds: object  # Histogram
    postprocess_seconds: object  # Histogram
    batch_size: object  # Histogram
    requests: object  # Counter{endpoint, code}
    request_seconds: object  # Histogram{endpoint}
    images: object  # Counter{endpoint}
    request_errors: object  # Counter{endpoint, error}
    model_info: object  # Gauge{model, version, opset, num_classes}
    model_load_seconds: object  # Gauge
    model_test_accuracy: object  # Gauge
    model_swaps: object  # Counter{outcome}
    shadow_info: object  # Gauge{model, version}
    shadow_predictions: object  # Counter{agree}
    shadow_score: object  # Histogram
    shadow_unknown: object  # Counter
    shadow_shed: object  # Counter
    drift_available: object  # Gauge
    drift_window_images: object  # Gauge
    drift_p_value: object  # Gauge{test}
    drift_detected: object  # Gauge
    drift_windows: object  # Counter{verdict}
    drift_skipped: object  # Counter
    drift_check_seconds: object  # Histogram
    estimated_accuracy: object  # Gauge{method}
    feedback: object  # Counter{predicted, actual, correct}
    feedback_replaced: object  # Counter{predicted, actual, correct}
    feedback_new_class: object  # Counter{predicted}
    feedback_predictions: object  # Counter
    feedback_score: object  # Counter
    feedback_rejected: object  # Counter{reason}
    captured: object  # Counter{reason}
    capture_evicted: object  # Counter
    capture_evicted_bytes: object  # Counter
    capture_dropped: object  # Counter
    capture_refused: object  # Counter{reason}
    feedback_received: object  # Counter{outcome}
    feedback_orphaned: object  # Counter
    log_written: object  # Counter
    log_dropped: object  # Counter
    log_failures: object  # Counter


@functools.cache
def get_metrics() -> Metrics:
    """The metric objects of this process, created on first use (inside a worker)."""
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        predictions=Counter(
            "classifier_predictions_total",
            "Images classified, by predicted label.",
            ["model", "version", "label"],
        ),
        prediction_score=Histogram(
            "classifier_prediction_score",
            "Top-1 softmax probability of each classified image.",
            buckets=SCORE_BUCKETS,
        ),
        ood_score_ratio=Histogram(
            "classifier_ood_score_ratio",
            "Each image's unknown-input score over the model's threshold: above 1 it is unlike "
            "the training images and answered 'unknown'.",
            buckets=OOD_RATIO_BUCKETS,
        ),
        inference_seconds=Histogram(
            "classifier_inference_seconds",
            "Seconds per onnxruntime call (one call may hold a batch of images).",
            buckets=LATENCY_BUCKETS,
        ),
        preprocess_seconds=Histogram(
            "classifier_preprocess_seconds",
            "Seconds to decode and preprocess one image.",
            buckets=LATENCY_BUCKETS,
        ),
        postprocess_seconds=Histogram(
            "classifier_postprocess_seconds",
            "Seconds to turn one request's logits into answers (calibrated softmax, verdicts, "
            "top-k).",
            buckets=LATENCY_BUCKETS,
        ),
        batch_size=Histogram(
            "classifier_batch_size",
            "Images per onnxruntime call, after adaptive batching.",
            buckets=BATCH_BUCKETS,
        ),
        requests=Counter(
            "classifier_requests_total",
            "HTTP requests answered, by endpoint and status code (health checks and /metrics "
            "not counted).",
            ["endpoint", "code"],
        ),
        request_seconds=Histogram(
            "classifier_request_duration_seconds",
            "Seconds from a request's arrival in the service to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        ),
        images=Counter(
            "classifier_images_total",
            "Images classified, by endpoint.",
            ["endpoint"],
        ),
        request_errors=Counter(
            "classifier_request_errors_total",
            "Requests answered with an error, by endpoint and the API's error code.",
            ["endpoint", "error"],
        ),
        model_info=Gauge(
            "classifier_model_info",
            "The served model (always 1).",
            ["model", "version", "opset", "num_classes"],
            multiprocess_mode="max",
        ),
        model_load_seconds=Gauge(
            "classifier_model_load_seconds",
            "Seconds the slowest worker took to load the model.",
            multiprocess_mode="max",
        ),
        model_test_accuracy=Gauge(
            "classifier_model_test_accuracy",
            "The served model's accuracy on its held-out test split, as trained.",
            multiprocess_mode="max",
        ),
        model_swaps=Counter(
            "classifier_model_swaps_total",
            "New model versions found at the model source, by outcome: swapped (it passed the "
            "start-up checks and serves now) or refused (it failed them; the served version "
            "kept serving).",
            ["outcome"],
        ),
        **shadow_metrics(Counter, Gauge, Histogram),
        **drift_metrics(Counter, Gauge, Histogram, LATENCY_BUCKETS),
        **feedback_metrics(Counter),
        captured=Counter(
            "classifier_captured_total",
            "Inputs kept for relabelling, by why (unknown, low_margin, sample).",
            ["reason"],
        ),
        capture_evicted=Counter(
            "classifier_capture_evicted_total",
            "Captured inputs evicted, oldest first, to keep the store within CAPTURE_MAX_BYTES.",
        ),
        capture_evicted_bytes=Counter(
            "classifier_capture_evicted_bytes_total",
            "Bytes of the captured inputs evicted.",
        ),
        capture_dropped=Counter(
            "classifier_capture_dropped_total",
            "Inputs to capture dropped because the writer was behind (its queue full).",
        ),
        capture_refused=Counter(
            "classifier_capture_refused_total",
            "Inputs or labels the capture store did not keep, by why: oversized (a file far "
            "larger than its image needs), write_failed (a full or read-only volume).",
            ["reason"],
        ),
        feedback_received=Counter(
            "classifier_feedback_received_total",
            "Labels stored by POST /feedback: joined (their prediction was in the log) or pending "
            "(not yet; counted in classifier_feedback_total once it lands).",
            ["outcome"],
        ),
        feedback_orphaned=Counter(
            "classifier_feedback_orphaned_total",
            "Labels whose prediction never reached the log within the retention.",
        ),
        log_written=Counter(
            "classifier_prediction_log_written_total",
            "Rows this worker wrote to the prediction log.",
        ),
        log_dropped=Counter(
            "classifier_prediction_log_dropped_total",
            "Rows dropped because the prediction log's buffer was full (database slow or down).",
        ),
        log_failures=Counter(
            "classifier_prediction_log_failures_total",
            "Writes to the prediction log that failed and will be retried.",
        ),
    )


def shadow_metrics(counter, gauge, histogram) -> dict:
    """The challenger's metrics (``SHADOW_MODEL``, :mod:`service.http.shadow`): beside the
    champion's own, on the same requests."""
    return {
        "shadow_info": gauge(
            "classifier_shadow_model_info",
            "The challenger run in the shadow of the served model (1 while it is).",
            ["model", "version"],
            multiprocess_mode="max",
        ),
        "shadow_predictions": counter(
            "classifier_shadow_predictions_total",
            "Images the challenger answered in the shadow, by whether its verdict (top class or "
            "unknown) agrees with the served model's.",
            ["agree"],
        ),
        "shadow_score": histogram(
            "classifier_shadow_score",
            "The challenger's calibrated top-1 probability of each image it answered.",
            buckets=SCORE_BUCKETS,
        ),
        "shadow_unknown": counter(
            "classifier_shadow_unknown_total",
            "Images the challenger's unknown-input detector flagged.",
        ),
        "shadow_shed": counter(
            "classifier_shadow_shed_total",
            "Images not shadowed because the challenger's queue was full (the worker was busy).",
        ),
    }


def feedback_metrics(counter) -> dict:
    """The feedback counters. Feedback that replaces an earlier label for the same prediction
    counts the new label in ``classifier_feedback_total`` and the old one in
    ``classifier_feedback_replaced_total``: the difference is each prediction counted once, with
    its last label, and every counter stays monotonic."""
    return {
        "feedback": counter(
            "classifier_feedback_total",
            "True labels received for predictions, by the top class predicted, the label, and "
            "whether they agree.",
            ["predicted", "actual", "correct"],
        ),
        "feedback_replaced": counter(
            "classifier_feedback_replaced_total",
            "Labels replaced by later feedback for the same prediction (subtract them from "
            "classifier_feedback_total and classifier_feedback_new_class_total); actual is "
            f"{NEW_CLASS!r} for a label the model does not know.",
            ["predicted", "actual", "correct"],
        ),
        "feedback_new_class": counter(
            "classifier_feedback_new_class_total",
            "Feedback naming a class the model does not know (a candidate new class).",
            ["predicted"],
        ),
        "feedback_predictions": counter(
            "classifier_feedback_predictions_total",
            "Predictions that received feedback (each once).",
        ),
        "feedback_score": counter(
            "classifier_feedback_score_total",
            "Sum of the calibrated top-1 scores of the predictions that received feedback: over "
            "classifier_feedback_predictions_total, the accuracy the scores expected of them.",
        ),
        "feedback_rejected": counter(
            "classifier_feedback_rejected_total",
            "Feedback refused for its bearer token (missing_token, wrong_token).",
            ["reason"],
        ),
    }


def record_model_loaded(contract: ModelContract, seconds: float) -> None:
    """Publish which model this worker serves, its test accuracy, and how long it took to
    load."""
    metrics = get_metrics()
    metrics.model_info.labels(
        contract.name, contract.version, str(contract.opset), str(contract.num_classes)
    ).set(1)
    metrics.model_load_seconds.set(seconds)
    if contract.metrics.get("test_accuracy") is not None:
        metrics.model_test_accuracy.set(float(contract.metrics["test_accuracy"]))


def record_model_unloaded(contract: ModelContract) -> None:
    """This worker no longer serves ``contract``'s version (it swapped to another)."""
    get_metrics().model_info.labels(
        contract.name, contract.version, str(contract.opset), str(contract.num_classes)
    ).set(0)


def record_predictions(contract: ModelContract, predictions: Predictions, endpoint: str) -> None:
    """Count classified images by endpoint and verdict (the top-1 label, or ``unknown`` for an
    input the detector flags, whatever ``UNKNOWN_LABEL`` says), and observe their top-1 scores
    and unknown-input scores."""
    metrics = get_metrics()
    metrics.images.labels(endpoint).inc(len(predictions))
    for verdict, score in zip(
        predictions.verdicts(contract.labels),
        predictions.probabilities.max(axis=1),
        strict=True,
    ):
        metrics.predictions.labels(contract.name, contract.version, verdict).inc()
        metrics.prediction_score.observe(float(score))
    if predictions.ood_scores is not None:
        for ood_score in predictions.ood_scores:
            metrics.ood_score_ratio.observe(float(ood_score) / contract.ood_threshold)


# Paths whose requests are not counted: probes and scrapes, many and uninteresting.
UNCOUNTED_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})


def record_request(path: str, status: int, seconds: float) -> None:
    """Count an answered request and observe its duration, by endpoint (and status code)."""
    if path in UNCOUNTED_PATHS:
        return
    metrics = get_metrics()
    endpoint = endpoint_label(path)
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.request_seconds.labels(endpoint).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """``/metrics``: every metric of every worker process of both services (prometheus-client's
    multiprocess files), in Prometheus's text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def record_error(path: str, code: str) -> None:
    """Count an error answer by endpoint and the API's error code."""
    get_metrics().request_errors.labels(endpoint_label(path), code).inc()
