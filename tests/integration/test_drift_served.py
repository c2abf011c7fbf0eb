"""Drift checks against a real ``bentoml serve`` of the tiny model: images of the built-in set
that its run never read keep the verdict "no drift"; the same images 30% darker turn it to
"drift" within two windows, and the metrics say so. A model trained before drift checks still
serves, with its drift metrics "not available"."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time

import httpx
import numpy as np
import onnx
import pytest

from benchmarks.servers import scrape
from service.core.contract import ModelContract
from service.core.drift import REFERENCE_FILE
from tests.helpers import bentoml_server, encode_image

WINDOW = 100
# Below the service's default level: this test must not fail on a window's 5% false alarm.
ALPHA = "0.01"


@pytest.fixture(scope="module")
def unseen_images(tiny_run) -> np.ndarray:
    """Images of the built-in set that the tiny run did not pick (it takes 40 per class)."""
    from training.config import TrainConfig
    from training.data.prepare import prepare_data
    from training.data.sources import load_animals

    metadata = __import__("json").loads((tiny_run["folder"] / "metadata.json").read_text())
    picked = prepare_data(TrainConfig.from_dict(metadata["config"])).images
    seen = {hashlib.sha1(image.tobytes()).digest() for image in picked.pixels}
    every = load_animals().pixels
    unseen = [image for image in every if hashlib.sha1(image.tobytes()).digest() not in seen]
    rng = np.random.default_rng(0)
    return np.stack(unseen)[rng.choice(len(unseen), 3 * WINDOW, replace=False)]


def classify_all(url: str, images: np.ndarray) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for image in images:
            files = {"image": ("image.png", encode_image(image, "PNG"), "image/png")}
            assert client.post("/classify", files=files).status_code == 200


def wait_for_windows(url: str, count: int) -> dict:
    """The metrics once ``count`` windows have been checked (the checker runs off the request
    path, so a moment after the last answer)."""
    deadline = time.monotonic() + 20
    while True:
        metrics = scrape(url)
        checked = sum(
            value for key, value in metrics.items() if key[0] == "classifier_drift_windows_total"
        )
        if checked >= count or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def drifted_windows(metrics: dict) -> float:
    return metrics.get(("classifier_drift_windows_total", (("verdict", "drift"),)), 0.0)


def test_darker_images_turn_the_verdict_to_drift(tiny_run, unseen_images):
    clean, darker = unseen_images[:WINDOW], (unseen_images[WINDOW:] * 0.7).astype(np.uint8)
    env = {"DRIFT_WINDOW": str(WINDOW), "DRIFT_ALPHA": ALPHA}
    with bentoml_server(tiny_run["folder"], workers=1, **env) as url:
        classify_all(url, clean)
        metrics = wait_for_windows(url, 1)
        assert metrics[("classifier_drift_available", ())] == 1
        assert metrics[("classifier_drift_window_images", ())] == WINDOW
        assert drifted_windows(metrics) == 0
        assert metrics[("classifier_drift_detected", ())] == 0
        summary = httpx.get(f"{url}/model").json()["drift"]
        assert summary["available"] and summary["last"]["drift"] is False
        assert set(summary["last"]["p_values"]) == {"bbsd", "knn", "label"}

        classify_all(url, darker)
        metrics = wait_for_windows(url, 3)
        assert drifted_windows(metrics) >= 1  # within the two darker windows
        assert metrics[("classifier_drift_detected", ())] == 1
        p_values = {
            dict(labels)["test"]: value
            for (name, labels), value in metrics.items()
            if name == "classifier_drift_p_value"
        }
        assert min(p_values.values()) < float(ALPHA) / 3
        for method in ("atc", "mean_confidence"):
            estimate = metrics[("classifier_estimated_accuracy", (("method", method),))]
            assert 0 <= estimate <= 1
        last = httpx.get(f"{url}/model").json()["drift"]["last"]
        assert last["drift"] is True and last["tests_fired"]


def test_a_model_without_a_reference_serves_with_drift_not_available(tiny_run, tmp_path):
    """An artifact from before drift checks: no reference file, no contract field."""
    older = tmp_path / "older"
    shutil.copytree(tiny_run["folder"], older)
    (older / REFERENCE_FILE).unlink()
    model = onnx.load(str(older / "model.onnx"))
    contract = ModelContract.read_from_onnx(model)
    dataclasses.replace(contract, drift_reference="").write_to_onnx(model)
    onnx.save(model, str(older / "model.onnx"))
    with bentoml_server(older, workers=1, DRIFT_WINDOW="10") as url:
        classify_all(url, np.zeros((12, 28, 28), dtype=np.uint8))
        time.sleep(0.5)
        metrics = scrape(url)
        assert metrics[("classifier_drift_available", ())] == 0
        assert not any(key[0] == "classifier_drift_windows_total" for key in metrics)
        summary = httpx.get(f"{url}/model").json()["drift"]
        assert summary["available"] is False and "train again" in summary["why"]
