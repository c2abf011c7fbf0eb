"""The training job end to end, through its real CLI, on small data."""

import json

import numpy as np
import pytest
from PIL import Image

from service.core.contract import ModelContract
from service.core.preprocessing import ImageSpec
from tests.helpers import run_training_cli, write_class_folder
from training.quality.outliers import REAL_DIGITS_SET

pytestmark = [pytest.mark.slow]

EVERY_ARTIFACT = [
    "model.keras",
    "model.onnx",
    "labels.json",
    "metadata.json",
    "ood_detector.npz",
    "history.json",
    "report.json",
    "plots/loss.png",
    "plots/accuracy.png",
    "plots/confusion_matrix.png",
]


def test_a_run_produces_every_artifact(tiny_run):
    folder = tiny_run["folder"]
    for name in EVERY_ARTIFACT:
        assert (folder / name).is_file(), name
    for plot in ("loss", "accuracy", "confusion_matrix", "reliability"):
        with Image.open(folder / "plots" / f"{plot}.png") as image:
            assert image.width >= 400 and image.height >= 300
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    assert labels == sorted(labels) and len(labels) == 10
    metadata = json.loads((folder / "metadata.json").read_text())
    contract = ModelContract.from_metadata(metadata)
    assert contract.image == ImageSpec(height=28, width=28, channels=1, resize_method="bilinear")
    assert list(contract.labels) == labels
    assert contract.name == "tiny" and contract.version == folder.name
    assert metadata["config"]["batch_size"] == 32 and metadata["config"]["max_per_class"] == 40
    assert metadata["data"]["splits"] == {"train": 280, "validation": 40, "test": 80}
    assert len(metadata["data"]["fingerprint"]) == 64
    assert {"tensorflow", "keras", "python"} <= set(metadata["versions"])
    report = json.loads((folder / "report.json").read_text())
    assert 0 <= report["test_accuracy"] <= 1
    assert np.asarray(report["confusion_matrix"]).sum() == 80
    history = json.loads((folder / "history.json").read_text())
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)


def test_the_run_calibrates_and_measures_its_unknown_input_detector(tiny_run):
    folder = tiny_run["folder"]
    report = json.loads((folder / "report.json").read_text())
    calibration, unknown = report["calibration"], report["unknown_inputs"]
    contract = ModelContract.from_metadata(json.loads((folder / "metadata.json").read_text()))
    assert contract.temperature == calibration["temperature"] > 0
    assert calibration["test_accuracy_after"] == calibration["test_accuracy_before"]
    assert calibration["test_accuracy_before"] == pytest.approx(report["test_accuracy"])
    assert 0 <= calibration["ece_after"] <= 1 and 0 <= calibration["ece_before"] <= 1
    assert contract.ood_output_name == "ood_score"
    assert contract.ood_threshold == pytest.approx(unknown["threshold"], rel=1e-4)
    assert unknown["acceptance"] == 0.95 and 0 <= unknown["test_flagged"] <= 1
    assert set(unknown["sets"]) == {
        "photo crops",
        "digits (8x8, upscaled)",
        REAL_DIGITS_SET,
        "uniform noise",
        "blank images",
        "inverted test images",
    }
    assert unknown["sets"][REAL_DIGITS_SET]["images"] == 1000
    assert "nearest-neighbour" in unknown["method"] and "3 layer(s)" in unknown["method"]
    # The temperature was judged on held-out folds, and the ECE carries its intervals.
    assert calibration["cross_validation"]["folds"] >= 2
    if calibration["temperature"] == 1.0:
        assert calibration["ece_change_ci"] == [0.0, 0.0]
    else:
        # Scaled only for a held-out gain beyond noise.
        assert calibration["cross_validation"]["nll_change_ci"][1] < 0
    for name in ("before", "after"):
        low, high = calibration[f"ece_{name}_ci"]
        assert low <= calibration[f"ece_{name}"] <= high
    for figures in unknown["sets"].values():
        assert 0 <= figures["flagged"] <= 1 and 0 <= figures["auroc"] <= 1
    assert "| uniform noise |" in tiny_run["result"].stdout
    # The exported graph computes the score, and the gate compared it with Keras.
    parity = json.loads((folder / "metadata.json").read_text())["export"]["parity"]
    assert parity["ood_max_abs_diff_over_threshold"] <= 1e-3
    assert "unknown-input score" in tiny_run["result"].stdout
    assert (folder / "ood_detector.npz").is_file()


def test_the_threshold_comes_from_training_and_validation_images_alone(tiny_run):
    """Refit the detector from the run's training split and set its threshold on its validation
    split, with nothing else: the same threshold the model ships. No near-miss image (the real
    digits) or other outlier set can have entered it."""
    import keras

    from training.config import TrainConfig
    from training.data.pipelines import make_dataset
    from training.data.prepare import prepare_data
    from training.model.cnn import detector_model, detector_widths, predict_embeddings
    from training.quality.detector import (
        DETECTOR_FILE,
        UnknownInputDetector,
        fit_detector,
        threshold_for,
    )

    folder = tiny_run["folder"]
    metadata = json.loads((folder / "metadata.json").read_text())
    config = TrainConfig.from_dict(metadata["config"])
    data = prepare_data(config)
    model = keras.saving.load_model(folder / "model.keras")
    embedder = detector_model(model)

    def embeddings(indices):
        dataset = make_dataset(
            data.images, indices, data.targets, data.spec, 64, training=False, seed=0
        )
        return predict_embeddings(embedder, dataset)

    _, train_features, train_labels = embeddings(data.splits.train)
    _, validation_features, _ = embeddings(data.splits.validation)
    widths = detector_widths(model)
    assert len(widths) == 3  # the CNN's three block outputs (28 -> 14 -> 7 -> 3)
    refitted = fit_detector(train_features, train_labels, data.num_classes, widths, config.seed)
    threshold = threshold_for(refitted.scores(validation_features), config.ood_acceptance)
    shipped = UnknownInputDetector.load(folder / DETECTOR_FILE)
    assert threshold == pytest.approx(shipped.threshold, rel=1e-5)
    assert ModelContract.from_metadata(metadata).ood_threshold == pytest.approx(threshold, rel=1e-5)
    np.testing.assert_allclose(refitted.bank, shipped.bank, rtol=1e-5, atol=1e-7)


def test_the_run_prints_labels_iterations_and_the_class_report(tiny_run):
    out = tiny_run["result"].stdout
    assert "iterations per epoch: ceil(280 / 32) = 9" in out
    assert "    0  bear" in out and "    9  zebra" in out
    assert "test accuracy" in out and "precision" in out


def test_latest_points_at_the_newest_complete_version(tiny_run):
    model_dir = tiny_run["output"] / "tiny"
    versions = [path for path in model_dir.iterdir() if not path.name.startswith((".", "latest"))]
    assert (model_dir / "latest").resolve() == max(versions).resolve()
    assert not [path for path in model_dir.iterdir() if path.name.startswith(".staging")]


def test_training_on_a_folder_of_image_files(tmp_path):
    data = write_class_folder(
        tmp_path / "shapes", {"square": 0, "hbar": 1, "vbar": 2}, per_class=30
    )
    (data / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = run_training_cli(
        "--data",
        str(data),
        "--image-size",
        "24",
        "--epochs",
        "2",
        "--output",
        str(tmp_path / "out"),
        "--name",
        "shapes",
        "--no-publish",
        "--audit",  # tested on its own (test_audit_jobs)
        "off",
    )
    assert result.returncode == 0, result.stderr
    assert "corrupt.png" in result.stderr and "skipped 1 unreadable" in result.stdout
    folder = tmp_path / "out" / "shapes" / "latest"
    metadata = json.loads((folder / "metadata.json").read_text())
    contract = ModelContract.from_metadata(metadata)
    assert contract.labels == ("hbar", "square", "vbar")
    assert contract.image.channels == 3 and contract.image.height == 24
    assert metadata["data"]["skipped_files"] == 1
    assert metadata["export"]["parity"]["passed"]
    # A folder of colour images gets the same calibration and unknown-input report.
    report = json.loads((folder / "report.json").read_text())
    # The five made sets and the real handwritten digits (opencv-doc, which make test installs).
    assert len(report["unknown_inputs"]["sets"]) == 6 and report["calibration"]["temperature"] > 0
    assert report["unknown_inputs"]["sets"][REAL_DIGITS_SET]["images"] == 1000
    assert "| photo crops |" in result.stdout and contract.has_detector


def test_cat_dog_other_folds_classes_and_reports_balanced_accuracy(tmp_path):
    result = run_training_cli(
        "--classes",
        "cat,dog",
        "--other",
        "other",
        "--max-per-class",
        "60",
        "--epochs",
        "1",
        "--output",
        str(tmp_path),
        "--name",
        "catdog",
        "--no-export",
        "--audit",
        "off",
    )
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "catdog" / "latest"
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    assert labels == ["cat", "dog", "other"]
    metadata = json.loads((folder / "metadata.json").read_text())
    weights = metadata["training"]["class_weight"]
    assert float(weights["2"]) < float(weights["0"])  # "other" is the largest class
    assert "balanced_accuracy" in json.loads((folder / "report.json").read_text())
    assert "class weights (balanced)" in result.stdout and "balanced accuracy" in result.stdout
