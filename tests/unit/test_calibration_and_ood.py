"""Temperature scaling and the Mahalanobis unknown-input detector, on data with known answers."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from service.core.postprocessing import softmax
from service.core.preprocessing import ImageSpec
from training.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
)
from training.ood import MahalanobisDetector, fit_mahalanobis, outlier_sets, threshold_for


def sampled(temperature: float, count: int = 20000, classes: int = 5, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature): T is the right answer."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(count, classes)).astype(np.float32)
    probabilities = softmax(logits / temperature)
    labels = np.array([rng.choice(classes, p=row / row.sum()) for row in probabilities])
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fitted_temperature_recovers_the_one_the_labels_were_drawn_with(true_temperature):
    logits, labels = sampled(true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_calibration_lowers_the_ece_of_an_overconfident_model_and_keeps_the_argmax():
    logits, labels = sampled(2.5)
    validation, test = slice(0, 10000), slice(10000, None)
    report = calibration_report(logits[validation], labels[validation], logits[test], labels[test])
    assert report["ece_before"] > 0.05  # softmax(logits) is overconfident here
    assert report["ece_after"] < 0.02 < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    assert report["test_accuracy_after"] == report["test_accuracy_before"]
    assert sum(report["reliability_after"]["count"]) == 10000


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_it_does_not():
    # Two bins' worth: confidence 0.75 right 3 times in 4; confidence 1.0 always wrong.
    calibrated = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 1])) == pytest.approx(0)
    wrong = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(wrong, np.array([1, 1, 1, 1])) == pytest.approx(1)


def test_detector_score_is_the_mahalanobis_distance_to_the_nearest_class_mean(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, size=(3, 6))
    labels = np.repeat(np.arange(3), 400)
    mixing = rng.normal(size=(6, 6))
    features = centres[labels] + rng.normal(size=(1200, 6)) @ mixing
    detector = fit_mahalanobis(features, labels, 3)
    means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    from sklearn.covariance import LedoitWolf

    precision = LedoitWolf().fit(features - means[labels]).precision_
    probes = rng.normal(0, 8, size=(20, 6))
    expected = [min(mahalanobis(x, mean, precision) for mean in means) for x in probes]
    np.testing.assert_allclose(detector.scores(probes), expected, rtol=1e-3)
    detector.threshold = threshold_for(detector.scores(features), 0.95)
    assert 0.03 <= np.mean(detector.scores(features) > detector.threshold) <= 0.05
    detector.save(tmp_path / "detector.npz")
    loaded = MahalanobisDetector.load(tmp_path / "detector.npz")
    np.testing.assert_array_equal(loaded.scores(probes), detector.scores(probes))
    assert loaded.threshold == detector.threshold


def test_the_threshold_accepts_the_promised_share_of_new_images_nine_runs_in_ten():
    # Scores of in-distribution images are draws of one distribution: set the threshold on
    # 1,000 of them, count the share of 100,000 new ones it accepts, over 300 runs.
    rng = np.random.default_rng(0)
    accepted = []
    for _ in range(300):
        threshold = threshold_for(rng.gamma(4, size=1000), 0.95)
        accepted.append(np.mean(rng.gamma(4, size=100_000) <= threshold))
    accepted = np.asarray(accepted)
    assert 0.87 <= np.mean(accepted >= 0.95) <= 0.95  # 90% confidence, no more than needed
    assert np.mean(accepted) < 0.965  # and not far stricter than asked
    # The plain 95% quantile keeps the promise only about half the time.
    plain = [
        np.mean(rng.gamma(4, size=100_000) <= np.quantile(rng.gamma(4, size=1000), 0.95))
        for _ in range(300)
    ]
    assert 0.35 <= np.mean(np.asarray(plain) >= 0.95) <= 0.65


@pytest.mark.parametrize("channels", [1, 3])
def test_outlier_sets_are_model_inputs_of_every_kind(channels):
    spec = ImageSpec(height=28, width=28, channels=channels)
    test_inputs = np.full((50, *spec.shape), 10, dtype=np.uint8)
    sets = outlier_sets(spec, test_inputs, seed=0, count=40)
    assert set(sets) == {
        "photo crops",
        "digits (8x8, upscaled)",
        "uniform noise",
        "blank images",
        "inverted test images",
    }
    for name, images in sets.items():
        assert images.dtype == np.uint8 and images.shape[1:] == spec.shape, name
        assert len(images) == 40, name
    assert (sets["inverted test images"] == 245).all()
    assert len({int(image.mean()) for image in sets["blank images"]}) > 10
