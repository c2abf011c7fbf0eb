"""Temperature scaling: one scalar T, fitted on the validation split, that divides the logits
before the softmax so that a score means a probability (Guo et al., 2017). The argmax, and so
the accuracy, is unchanged.

Scaling must not make a model worse: T is first fitted and judged by cross-validation on the
validation split (fitted on all folds but one, its negative log-likelihood measured on the one
left out); unless that held-out NLL is lower than at T = 1 beyond noise (the bootstrap interval
of the change, image by image, is below 0), T = 1 is kept. At high accuracy a validation split
holds few errors, and they decide T: a gain measured on a handful of them is not one. The test
split's expected calibration error is reported with a bootstrap confidence interval, before,
after and for the change, so that a change within noise is not called a gain.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from service.core.postprocessing import softmax

ECE_BINS = 15
CV_FOLDS = 5
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE_LEVEL = 0.95
# Searched in log space: T from about 0.05 to 20.
LOG_TEMPERATURE_BOUNDS = (-3.0, 3.0)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(np.mean(_per_image_nll(logits, labels, temperature)))


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


def cross_validated_nll(
    logits: np.ndarray, labels: np.ndarray, folds: int = CV_FOLDS, seed: int = 0
) -> dict:
    """Held-out NLL of temperature scaling on ``(logits, labels)``: T fitted on all folds but
    one, the NLL measured on the one left out, over ``folds`` stratified folds (fewer when a
    class has fewer images).

    Returns:
        ``{"folds", "nll_scaled", "nll_unscaled", "nll_change_ci", "fold_temperatures"}``: mean
        held-out NLL with each fold's T and with T = 1, the bootstrap interval of the mean
        change (scaled minus unscaled, paired image by image), and each fold's T. ``folds`` is
        0 (nothing measured) when there are too few images to split.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    largest_class = int(np.bincount(labels).max()) if len(labels) else 0
    folds = min(folds, len(labels) // 2, largest_class)
    if folds < 2:
        return {
            "folds": 0,
            "nll_scaled": None,
            "nll_unscaled": None,
            "nll_change_ci": None,
            "fold_temperatures": [],
        }
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    change = np.zeros(len(labels))  # each image's held-out NLL, scaled minus unscaled
    scaled = unscaled = 0.0
    temperatures = []
    with warnings.catch_warnings():
        # A class with fewer images than folds is spread as well as it can be; that is fine.
        warnings.simplefilter("ignore", UserWarning)
        parts = list(splitter.split(logits, labels))
    for fit_on, held_out in parts:
        temperature = fit_temperature(logits[fit_on], labels[fit_on])
        temperatures.append(temperature)
        with_t = _per_image_nll(logits[held_out], labels[held_out], temperature)
        without = _per_image_nll(logits[held_out], labels[held_out], 1.0)
        change[held_out] = with_t - without
        scaled += with_t.sum() / len(labels)
        unscaled += without.sum() / len(labels)
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(labels), size=(BOOTSTRAP_SAMPLES, len(labels)))
    tails = [100 * (1 - CONFIDENCE_LEVEL) / 2, 100 * (1 + CONFIDENCE_LEVEL) / 2]
    interval = np.percentile(change[resamples].mean(axis=1), tails)
    return {
        "folds": folds,
        "nll_scaled": round(float(scaled), 6),
        "nll_unscaled": round(float(unscaled), 6),
        "nll_change_ci": [round(float(value), 6) for value in interval],
        "fold_temperatures": temperatures,
    }


def _per_image_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return -log_softmax(scaled, axis=-1)[np.arange(len(labels)), labels]


def choose_temperature(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple:
    """T fitted on the whole validation split if scaling lowers its cross-validated NLL beyond
    noise (the upper end of the change's 95% bootstrap interval is below 0), else 1.

    Returns:
        ``(temperature, the cross-validation figures with a "decision" line)``.
    """
    figures = cross_validated_nll(logits, labels, seed=seed)
    if figures["folds"] == 0:
        return 1.0, figures | {"decision": "T = 1: too few validation images to judge scaling"}
    low, high = figures["nll_change_ci"]
    measured = (
        f"the held-out NLL from {figures['nll_unscaled']:.4f} to {figures['nll_scaled']:.4f} in "
        f"{figures['folds']}-fold cross-validation on the validation split (change "
        f"[{low:+.4f}, {high:+.4f}], 95% interval)"
    )
    if high < 0:
        temperature = fit_temperature(logits, labels)
        return temperature, figures | {"decision": f"T = {temperature:.4g}: it lowered {measured}"}
    if figures["nll_scaled"] < figures["nll_unscaled"]:
        decision = f"T = 1 kept: scaling lowered {measured}, a change within noise"
    else:
        decision = f"T = 1 kept: scaling raised {measured}"
    return 1.0, figures | {"decision": decision}


def _bin_statistics(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Each image's confidence bin, confidence and correctness, as :func:`reliability_bins`."""
    confidence = probabilities.max(axis=-1).astype(np.float64)
    correct = (probabilities.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    return which, confidence, correct


def _bootstrap_ece(statistics, resamples: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """ECE of each resample: ``resamples`` is ``(B, N)`` indices into the images."""
    which, confidence, correct = statistics
    offsets = np.arange(len(resamples))[:, np.newaxis] * bins
    keys = (which[resamples] + offsets).ravel()
    size = len(resamples) * bins
    gap = np.bincount(keys, weights=(correct - confidence)[resamples].ravel(), minlength=size)
    # Sum over bins of |sum of (correct - confidence)| in the bin, over N: the count-weighted
    # mean |accuracy - confidence|.
    return np.abs(gap.reshape(len(resamples), bins)).sum(axis=1) / resamples.shape[1]


def ece_intervals(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = CONFIDENCE_LEVEL,
    seed: int = 0,
) -> dict:
    """Bootstrap (percentile) confidence intervals of the ECE of ``before`` and ``after``
    probabilities of the same images, and of the change ``after - before`` (paired: both are
    measured on each resample).

    Returns:
        ``{"ece_before_ci", "ece_after_ci", "ece_change_ci"}``, each ``[low, high]``.
    """
    if len(labels) == 0:
        return {"ece_before_ci": None, "ece_after_ci": None, "ece_change_ci": None}
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(labels), size=(samples, len(labels)))
    ece_before = _bootstrap_ece(_bin_statistics(before, labels), resamples)
    ece_after = _bootstrap_ece(_bin_statistics(after, labels), resamples)
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(values: np.ndarray) -> list[float]:
        return [round(float(value), 5) for value in np.percentile(values, tails)]

    return {
        "ece_before_ci": interval(ece_before),
        "ece_after_ci": interval(ece_after),
        "ece_change_ci": interval(ece_after - ece_before),
    }


def change_verdict(change_ci: list[float] | None) -> str:
    """What the interval of the ECE's change allows one to say."""
    if change_ci is None:
        return "not measured"
    if change_ci == [0.0, 0.0]:
        return "unchanged (T = 1)"
    if change_ci[1] < 0:
        return "lower (the interval of the change is below 0)"
    if change_ci[0] > 0:
        return "higher (the interval of the change is above 0)"
    return "no change beyond noise (the interval of the change includes 0)"


def calibration_report(
    validation_logits: np.ndarray,
    validation_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    seed: int = 0,
) -> dict:
    """Choose T on the validation split (:func:`choose_temperature`) and measure the test split
    before and after, with the ECE's confidence intervals.

    Returns:
        ``{"temperature", "fitted_on", "cross_validation", "ece_before", "ece_after",
        "ece_before_ci", "ece_after_ci", "ece_change_ci", "ece_change", "nll_before",
        "nll_after", "test_accuracy_before", "test_accuracy_after", "reliability_before",
        "reliability_after"}``.
    """
    temperature, cross_validation = choose_temperature(
        validation_logits, validation_labels, seed=seed
    )
    before = softmax(test_logits)
    after = softmax(test_logits / temperature)
    intervals = ece_intervals(before, after, test_labels, seed=seed)
    return {
        "temperature": temperature,
        "fitted_on": "validation split",
        "cross_validation": cross_validation,
        "ece_before": expected_calibration_error(before, test_labels),
        "ece_after": expected_calibration_error(after, test_labels),
        **intervals,
        "ece_change": change_verdict(intervals["ece_change_ci"]),
        "nll_before": round(negative_log_likelihood(test_logits, test_labels, 1.0), 5),
        "nll_after": round(negative_log_likelihood(test_logits, test_labels, temperature), 5),
        "test_accuracy_before": float(np.mean(before.argmax(-1) == test_labels)),
        "test_accuracy_after": float(np.mean(after.argmax(-1) == test_labels)),
        "reliability_before": reliability_bins(before, test_labels),
        "reliability_after": reliability_bins(after, test_labels),
    }


def _interval(values) -> str:
    return "not measured" if values is None else f"[{values[0]:.4f}, {values[1]:.4f}]"


def format_calibration(calibration: dict) -> str:
    """The calibration's lines: the temperature chosen and why, the test ECE before and after
    with their 95% intervals, and what the interval of the change allows one to say."""
    decision = calibration.get("cross_validation", {}).get(
        "decision", f"T = {calibration['temperature']:.4g}"
    )
    return (
        f"Calibration: {decision}. Test accuracy {calibration['test_accuracy_before']:.4f} "
        f"(unchanged by calibration); test ECE {calibration['ece_before']:.4f} "
        f"{_interval(calibration.get('ece_before_ci'))} before, {calibration['ece_after']:.4f} "
        f"{_interval(calibration.get('ece_after_ci'))} after (95% bootstrap intervals); the "
        f"change {_interval(calibration.get('ece_change_ci'))}: "
        f"{calibration.get('ece_change', 'not measured')}."
    )
