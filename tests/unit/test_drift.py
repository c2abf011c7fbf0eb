"""The drift tests and label-free estimates of service/core/drift.py, on seeded synthetic scores:
their false-alarm rates stay within their level's binomial interval, and they see planted
shifts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, ks_2samp

from service.core.drift import (
    BBSD,
    KNN,
    LABEL,
    REFERENCE_FILE,
    DriftReference,
    ReferenceError,
    atc_fit,
    build_reference,
    check_window,
    ks_pvalue,
    ks_statistics,
    load_reference,
)

CLASSES = 10
ALPHA = 0.05


def scores_like(rng: np.random.Generator, count: int, concentration: float = 0.3):
    """Softmax-like scores of ``count`` images and their labels: Dirichlet rows sharpened
    around a label, and an unknown-input score that grows as confidence falls."""
    labels = rng.integers(0, CLASSES, count)
    rows = rng.dirichlet(np.full(CLASSES, concentration), count)
    rows[np.arange(count), labels] += 1.5
    rows /= rows.sum(axis=1, keepdims=True)
    ood = rng.gamma(4.0, 0.25, count) + (1 - rows.max(axis=1))
    return rows.astype(np.float32), labels, ood.astype(np.float32)


def reference(rng: np.random.Generator, count: int = 1000) -> DriftReference:
    probabilities, labels, ood = scores_like(rng, count)
    return build_reference(probabilities, labels, ood, rng.integers(0, CLASSES, 5000))


def test_the_ks_test_agrees_with_scipy():
    rng = np.random.default_rng(0)
    for m, n, shift in [(1000, 50, 0.0), (1000, 200, 0.2), (300, 1000, 0.1)]:
        a, b = rng.normal(size=m), rng.normal(shift, size=n)
        statistic = ks_statistics(np.sort(a), b)
        expected = ks_2samp(a, b, method="asymp")
        assert statistic == pytest.approx(expected.statistic)
        assert ks_pvalue(statistic, m, n) == pytest.approx(expected.pvalue, abs=0.02)


def test_each_detector_false_alarms_within_its_level_on_clean_windows():
    """400 seeded windows like their reference: each family at level ALPHA, and the verdict,
    reject no more often than the binomial interval of ALPHA allows (99%); the single KS test,
    exact at its level, also no less often."""
    rng = np.random.default_rng(7)
    trials = 400
    rejected = {BBSD: 0, KNN: 0, LABEL: 0, "verdict": 0}
    for _ in range(trials):
        ref = reference(rng)
        probabilities, _, ood = scores_like(rng, 100)
        result = check_window(ref, probabilities, ood, ALPHA)
        for name in (BBSD, KNN, LABEL):
            rejected[name] += result.p_values[name] < ALPHA
        rejected["verdict"] += result.drifted
    low, high = binom.ppf([0.005, 0.995], trials, ALPHA) / trials
    rates = {name: count / trials for name, count in rejected.items()}
    assert all(rate <= high for rate in rates.values()), rates
    assert rates[KNN] >= low, rates


def test_planted_shifts_are_detected():
    rng = np.random.default_rng(3)
    ref = reference(rng)
    # Less confident scores (a darker camera): the score distributions move.
    probabilities, _, ood = scores_like(rng, 200, concentration=1.5)
    result = check_window(ref, probabilities, ood + 0.3)
    assert result.drifted and {BBSD, KNN} <= set(result.tests_fired())
    # Three classes three times as common: the predicted shares move, and name them.
    probabilities, labels, ood = scores_like(rng, 600)
    weights = np.where(labels < 3, 3.0, 1.0)
    chosen = rng.choice(600, 200, replace=False, p=weights / weights.sum())
    result = check_window(ref, probabilities[chosen], ood[chosen])
    assert LABEL in result.tests_fired()
    moved = {label for label, _, _ in result.moved_classes([str(k) for k in range(CLASSES)])}
    assert moved and moved <= {"0", "1", "2"}


def test_atc_estimates_the_accuracy_it_was_fitted_on():
    rng = np.random.default_rng(5)
    probabilities, labels, ood = scores_like(rng, 2000)
    confidences = probabilities.max(axis=1)
    correct = rng.random(2000) < confidences  # calibrated: right as often as it is sure
    threshold, tie_weight = atc_fit(confidences, correct)
    assert tie_weight <= 1 and np.mean(confidences > threshold) == pytest.approx(
        correct.mean(), abs=0.002
    )
    ref = build_reference(
        probabilities, np.where(correct, probabilities.argmax(1), -1), ood, labels
    )
    result = check_window(ref, probabilities[:500], ood[:500])
    assert result.estimates["atc"] == pytest.approx(correct[:500].mean(), abs=0.06)


def test_atc_counts_scores_tied_at_the_threshold():
    """A confident model's top-1 scores saturate at 1.0: the ties count at the weight that
    gives the validation split its own accuracy back."""
    confidences = np.concatenate([np.full(900, 1.0), np.linspace(0.5, 0.99, 100)])
    correct = np.arange(1000) < 950
    probabilities = np.zeros((1000, 2), dtype=np.float32)
    probabilities[:, 0], probabilities[:, 1] = confidences, 1 - confidences
    ref = build_reference(probabilities, np.where(correct, 0, 1), None, np.zeros(10, int))
    assert ref.atc_threshold < 1.0 and ref.atc_estimate(confidences) == pytest.approx(0.95)
    perfect = build_reference(probabilities, np.zeros(1000, int), None, np.zeros(10, int))
    assert perfect.atc_estimate(confidences) == pytest.approx(1.0)
    assert perfect.atc_estimate(np.full(10, 0.4)) == 0.0


def test_a_reference_round_trips_and_a_missing_one_says_why(tmp_path):
    rng = np.random.default_rng(1)
    probabilities, labels, ood = scores_like(rng, 300)
    features = rng.normal(size=(1500, 8))
    ref = build_reference(probabilities, labels, ood, labels, features)
    assert ref.features.shape == (1000, 8)  # a sample
    ref.save(tmp_path / REFERENCE_FILE)
    loaded, why = load_reference(tmp_path, REFERENCE_FILE)
    assert why == "" and np.array_equal(loaded.probabilities, ref.probabilities)
    assert loaded.atc_threshold == ref.atc_threshold and np.allclose(loaded.priors, ref.priors)
    without, _ = load_reference(tmp_path, REFERENCE_FILE, features=False)
    assert without.features is None
    assert load_reference(tmp_path, "")[0] is None
    missing, why = load_reference(tmp_path / "elsewhere", REFERENCE_FILE)
    assert missing is None and "train again" in why
    (tmp_path / REFERENCE_FILE).write_bytes(b"not a reference")
    with pytest.raises(ReferenceError, match=REFERENCE_FILE):
        DriftReference.load(tmp_path / REFERENCE_FILE)
    assert load_reference(tmp_path, REFERENCE_FILE)[0] is None
