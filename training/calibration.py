"""Temperature scaling: one scalar T, fitted on the validation split, that divides the logits
before the softmax so that a score means a probability (Guo et al., 2017). The argmax, and so
the accuracy, is unchanged."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from service.core.postprocessing import softmax

ECE_BINS = 15
# Searched in log space: T from about 0.05 to 20.
LOG_TEMPERATURE_BOUNDS = (-3.0, 3.0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return float(-np.mean(log_softmax(scaled, axis=-1)[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (integer) under
    ``softmax(logits / T)``; 1.0 when there is nothing to fit on."""
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=LOG_TEMPERATURE_BOUNDS,
        method="bounded",
    )
    return round(float(np.exp(result.x)), 4)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Top-1 confidence against accuracy in ``bins`` equal-width confidence bins.

    Returns:
        ``{"edges", "confidence", "accuracy", "count"}``, the last three per bin (None if empty).
    """
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of 0 goes to the first.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    mean_confidence, accuracy, count = [], [], []
    for index in range(bins):
        members = which == index
        count.append(int(members.sum()))
        mean_confidence.append(float(confidence[members].mean()) if members.any() else None)
        accuracy.append(float(correct[members].mean()) if members.any() else None)
    return {
        "edges": edges.tolist(),
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count,
    }


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """The count-weighted mean |accuracy - confidence| over confidence bins."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(table["count"])
    if total == 0:
        return 0.0
    gaps = [
        count * abs(accuracy - confidence)
        for count, accuracy, confidence in zip(
            table["count"], table["accuracy"], table["confidence"], strict=True
        )
        if count
    ]
    return round(float(sum(gaps) / total), 5)


def calibration_report(
    validation_logits: np.ndarray,
    validation_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
) -> dict:
    """Fit T on the validation split and measure the test split before and after.

    Returns:
        ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after",
        "test_accuracy_before", "test_accuracy_after", "reliability_before",
        "reliability_after"}``.
    """
    temperature = fit_temperature(validation_logits, validation_labels)
    before = softmax(test_logits)
    after = softmax(test_logits / temperature)
    return {
        "temperature": temperature,
        "fitted_on": "validation split",
        "ece_before": expected_calibration_error(before, test_labels),
        "ece_after": expected_calibration_error(after, test_labels),
        "nll_before": round(negative_log_likelihood(test_logits, test_labels, 1.0), 5),
        "nll_after": round(negative_log_likelihood(test_logits, test_labels, temperature), 5),
        "test_accuracy_before": float(np.mean(before.argmax(-1) == test_labels)),
        "test_accuracy_after": float(np.mean(after.argmax(-1) == test_labels)),
        "reliability_before": reliability_bins(before, test_labels),
        "reliability_after": reliability_bins(after, test_labels),
    }
