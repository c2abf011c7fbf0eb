"""Temperature scaling (and its refusal to make things worse), the ECE's confidence intervals,
and the unknown-input detector, on data with known answers."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from service.core.postprocessing import softmax
from service.core.preprocessing import ImageSpec
from training.quality.calibration import (
    calibration_report,
    choose_temperature,
    ece_intervals,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from training.quality.detector import (
    UnknownInputDetector,
    fit_detector,
    fit_mahalanobis,
    threshold_for,
)
from training.quality.outliers import REAL_DIGITS_SET, opencv_digits, outlier_sets


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
    # Cross-validation on the validation split agreed, and the gain is beyond noise.
    folds = report["cross_validation"]
    assert folds["folds"] == 5 and folds["nll_scaled"] < folds["nll_unscaled"]
    assert all(t == pytest.approx(2.5, rel=0.1) for t in folds["fold_temperatures"])
    low, high = report["ece_change_ci"]
    assert high < 0 and report["ece_change"].startswith("lower")


def test_temperature_one_is_kept_when_scaling_does_not_lower_the_held_out_nll():
    # 49 confident right answers and one confident mistake: on the whole split a higher T lowers
    # the NLL (the mistake dominates it), but a T fitted without the mistake makes it worse on
    # the fold that holds it, and one fitted with it blurs the right answers of the others.
    logits = np.tile(np.float32([10.0, 0.0, 0.0]), (50, 1))
    labels = np.zeros(50, dtype=int)
    labels[7] = 1
    in_sample = fit_temperature(logits, labels)
    assert in_sample > 1.5
    assert negative_log_likelihood(logits, labels, in_sample) < negative_log_likelihood(
        logits, labels, 1.0
    )
    temperature, figures = choose_temperature(logits, labels)
    assert temperature == 1.0
    assert figures["nll_scaled"] > figures["nll_unscaled"]
    assert figures["decision"].startswith("T = 1 kept")
    report = calibration_report(logits, labels, logits, labels)
    assert report["temperature"] == 1.0 and report["ece_after"] == report["ece_before"]
    assert report["ece_change_ci"] == [0.0, 0.0] and report["ece_change"].startswith("unchanged")


def test_a_gain_within_noise_keeps_temperature_one():
    # Right on 995 of 1,000 images (margins 4 to 14), five mistakes at a margin of 3: scaling
    # lowers the mean held-out NLL, but the gain rests on those five images and its bootstrap
    # interval reaches above 0. An overconfident model with a real gain is still scaled.
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (1000, 3)).astype(np.float32)
    logits[:, 0] += rng.uniform(4, 14, 1000).astype(np.float32)
    labels = np.zeros(1000, dtype=int)
    logits[:5, 0], labels[:5] = 3.0, 1
    temperature, figures = choose_temperature(logits, labels)
    assert figures["nll_scaled"] < figures["nll_unscaled"]
    low, high = figures["nll_change_ci"]
    assert low < 0 < high
    assert temperature == 1.0 and "within noise" in figures["decision"]
    temperature, figures = choose_temperature(*sampled(2.5, 1000))
    assert figures["nll_change_ci"][1] < 0 and temperature > 1.5
    assert figures["decision"].startswith(f"T = {temperature:.4g}: it lowered")


def test_temperature_one_is_kept_without_enough_validation_images():
    temperature, figures = choose_temperature(np.zeros((1, 3)), np.zeros(1, dtype=int))
    assert (temperature, figures["folds"]) == (1.0, 0)
    assert (
        calibration_report(np.zeros((0, 3)), np.zeros(0, int), *sampled(2.0, 50))["temperature"]
        == 1.0
    )


def test_ece_intervals_hold_the_estimate_and_narrow_with_more_images():
    logits, labels = sampled(1.5, count=8000, seed=3)
    widths = []
    for count in (500, 8000):
        before, after = softmax(logits[:count]), softmax(logits[:count] / 1.5)
        intervals = ece_intervals(before, after, labels[:count])
        for name, probabilities in (("before", before), ("after", after)):
            low, high = intervals[f"ece_{name}_ci"]
            assert low <= expected_calibration_error(probabilities, labels[:count]) <= high
        widths.append(np.diff(intervals["ece_before_ci"])[0])
        # The same images scored twice the same way: no change, exactly.
        assert ece_intervals(before, before, labels[:count])["ece_change_ci"] == [0.0, 0.0]
    assert widths[1] < widths[0] / 2  # 16 times the images: about a quarter of the width


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
    loaded = UnknownInputDetector.load(tmp_path / "detector.npz")
    np.testing.assert_array_equal(loaded.scores(probes), detector.scores(probes))
    assert loaded.threshold == detector.threshold and loaded.bank is None


def relu_clusters(seed: int = 2, per_class: int = 300):
    """Non-negative embeddings (as after a ReLU and pooling) of three classes, each a cloud
    along its own direction (two features of eight), at sizes from 2 to 6."""
    rng = np.random.default_rng(seed)
    directions = np.zeros((3, 8))
    for k in range(3):
        directions[k, 2 * k : 2 * k + 2] = 1.0
    labels = np.repeat(np.arange(3), per_class)
    scale = rng.uniform(2, 6, size=(len(labels), 1))
    noise = np.abs(rng.normal(0, 0.15, size=(len(labels), 8)))
    return (directions[labels] * scale + noise).astype(np.float32), labels, directions


def test_nearest_neighbour_part_is_the_distance_to_the_kth_nearest_normalised_embedding():
    features, labels, _ = relu_clusters()
    detector = fit_detector(features, labels, 3, seed=0, k=5, mahalanobis=True)
    assert detector.bank.shape == features.shape and detector.k == 5
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    probes = np.abs(np.random.default_rng(5).normal(size=(30, 8))).astype(np.float32)
    probes_unit = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    distances = np.linalg.norm(probes_unit[:, None, :] - unit[None], axis=2)
    expected = np.sort(distances, axis=1)[:, 4]
    (knn,) = detector.knn(probes)
    np.testing.assert_allclose(knn, expected, rtol=1e-5, atol=1e-6)
    # The score is the larger part, each over its scale; both scales are training quantiles.
    (scale,) = detector.knn_scales
    parts = np.maximum(detector.mahalanobis(probes) / detector.mahalanobis_scale, knn / scale)
    np.testing.assert_allclose(detector.scores(probes), parts, rtol=1e-6)
    on_training = np.maximum(
        detector.mahalanobis(features) / detector.mahalanobis_scale,
        detector.knn(features, skip=1)[0] / scale,
    )
    assert 0.05 <= np.mean(on_training > 1) <= 0.1  # each part flags 5% of its own images
    assert fit_detector(features, labels, 3).projection is None  # nearest neighbours alone


def test_with_several_layers_the_score_is_the_mean_of_each_layers_scaled_distance(tmp_path):
    features, labels, _ = relu_clusters()
    # A second "layer": the same images' features, shuffled and rescaled (its own unit).
    rng = np.random.default_rng(4)
    second = features[:, rng.permutation(8)][:, :5] * 10
    both = np.concatenate([features, second], axis=1)
    detector = fit_detector(both, labels, 3, widths=(8, 5), seed=0)
    first = fit_detector(features, labels, 3, seed=0)
    other = fit_detector(second, labels, 3, seed=0)
    probes = np.abs(rng.normal(size=(20, 13))).astype(np.float32)
    assert [part.shape[1] for part in detector.layers(probes)] == [8, 5]
    np.testing.assert_allclose(detector.knn_scales, first.knn_scales + other.knn_scales)
    expected = (first.scores(probes[:, :8]) + other.scores(probes[:, 8:])) / 2
    np.testing.assert_allclose(detector.scores(probes), expected, rtol=1e-5)
    detector.threshold = 1.5
    detector.save(tmp_path / "detector.npz")
    loaded = UnknownInputDetector.load(tmp_path / "detector.npz")
    np.testing.assert_array_equal(loaded.scores(probes), detector.scores(probes))
    assert (loaded.widths, loaded.threshold, loaded.projection) == ((8, 5), 1.5, None)


def test_each_part_flags_what_the_other_misses(tmp_path):
    features, labels, directions = relu_clusters()
    train, validation = np.arange(0, 900, 2), np.arange(1, 900, 2)
    detector = fit_detector(features[train], labels[train], 3, seed=0, mahalanobis=True)
    detector.threshold = threshold_for(detector.scores(features[validation]), 0.95)
    assert np.mean(detector.scores(features[validation]) > detector.threshold) <= 0.05
    rng = np.random.default_rng(3)
    (scale,) = detector.knn_scales
    # Far: 20 times a class's usual size, in a known direction: Mahalanobis sees it, the
    # nearest-neighbour part (which sees directions only) does not.
    far = directions[[0, 1, 2] * 10] * 100 + np.abs(rng.normal(0, 0.15, size=(30, 8)))
    assert np.all(detector.mahalanobis(far) / detector.mahalanobis_scale > detector.threshold)
    assert np.all(detector.knn(far)[0] / scale < detector.threshold)
    # Near: the usual size, halfway between two classes' directions, where no training image
    # lies: far from every neighbour.
    near = (directions[0] + directions[1]) * rng.uniform(1.5, 4, (30, 1))
    near += np.abs(rng.normal(0, 0.15, size=(30, 8)))
    assert np.all(detector.knn(near)[0] / scale > detector.threshold)
    assert np.all(detector.scores(far) > detector.threshold)
    assert np.all(detector.scores(near) > detector.threshold)
    detector.save(tmp_path / "detector.npz")
    loaded = UnknownInputDetector.load(tmp_path / "detector.npz")
    np.testing.assert_array_equal(loaded.scores(near), detector.scores(near))
    assert (loaded.k, loaded.threshold) == (detector.k, detector.threshold)


def test_the_bank_keeps_a_stratified_share_when_the_training_split_is_large():
    features, labels, _ = relu_clusters(per_class=300)
    from training.quality.detector import bank_indices

    kept = bank_indices(labels, width=8, seed=0, budget=8 * 8 * 90)
    assert len(kept) == 90 and np.bincount(labels[kept]).tolist() == [30, 30, 30]
    assert len(bank_indices(labels, width=8, seed=0, rows=300)) == 300
    assert len(bank_indices(labels, width=8, seed=0)) == len(labels)


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
        REAL_DIGITS_SET,
        "uniform noise",
        "blank images",
        "inverted test images",
    }
    for name, images in sets.items():
        assert images.dtype == np.uint8 and images.shape[1:] == spec.shape, name
        assert len(images) == (1000 if name == REAL_DIGITS_SET else 40), name
    assert (sets["inverted test images"] == 245).all()
    assert len({int(image.mean()) for image in sets["blank images"]}) > 10


def test_real_digits_are_read_as_500_of_each_digit():
    cells, labels = opencv_digits()
    assert cells.shape == (5000, 20, 20) and cells.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # White ink on black, as the animals: mostly background, some strokes.
    assert 0.05 < np.mean(cells > 128) < 0.3
    # A row of ones holds less ink than a row of zeros.
    assert cells[labels == 1].mean() < cells[labels == 0].mean()


def test_a_missing_digits_file_is_named_with_its_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install opencv-doc"):
        opencv_digits(tmp_path / "digits.png")
