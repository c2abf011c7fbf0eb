"""The drift checks' Prometheus metrics (:mod:`service.http.drift`), defined beside the others
in :func:`service.http.metrics.get_metrics`."""

from __future__ import annotations


def drift_metrics(counter, gauge, histogram, buckets) -> dict:
    """The drift checks' metrics (:mod:`service.http.drift`): each API worker tests its own
    window of the last answered images against the model's reference; the gauges show the
    latest window checked by any live worker."""
    return {
        "drift_available": gauge(
            "classifier_drift_available",
            "1 when the served model ships a drift reference and its windows are checked; 0 when "
            "not (a model trained before drift checks, or DRIFT_WINDOW=0): drift not available.",
            multiprocess_mode="max",
        ),
        "drift_window_images": gauge(
            "classifier_drift_window_images",
            "Images per checked window (DRIFT_WINDOW).",
            multiprocess_mode="max",
        ),
        "drift_p_value": gauge(
            "classifier_drift_p_value",
            "The latest window's p-value per test family, Bonferroni-corrected: bbsd (a KS test "
            "per class on the calibrated scores), knn (KS on the unknown-input score), label "
            "(the predicted-class shares). Below DRIFT_ALPHA / tests: drift.",
            ["test"],
            multiprocess_mode="livemostrecent",
        ),
        "drift_detected": gauge(
            "classifier_drift_detected",
            "1 when the latest checked window differs from the reference (drift), else 0.",
            multiprocess_mode="livemostrecent",
        ),
        "drift_windows": counter(
            "classifier_drift_windows_total",
            "Windows checked, by verdict (drift, no_drift). Each has at most DRIFT_ALPHA chance "
            "of a false alarm: alert on the share of drifted windows, not on one.",
            ["verdict"],
        ),
        "drift_skipped": counter(
            "classifier_drift_skipped_total",
            "Full windows left unchecked because the checker was still busy with the last one.",
        ),
        "drift_check_seconds": histogram(
            "classifier_drift_check_seconds",
            "Seconds one window's tests took, off the request path.",
            buckets=buckets,
        ),
        "estimated_accuracy": gauge(
            "classifier_estimated_accuracy",
            "The latest window's accuracy estimated without labels, by method: atc (Average "
            "Thresholded Confidence) or mean_confidence (the mean top-1 score).",
            ["method"],
            multiprocess_mode="livemostrecent",
        ),
    }
