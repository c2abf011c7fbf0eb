"""Shared fixtures: a throw-away model store, and a tiny model trained once per test session and
served by a real ``bentoml serve``."""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.helpers import bentoml_server, run_training_cli


def pytest_configure(config):
    # Every model-store write of the tests goes to a throw-away store, never the user's.
    # Set before anything imports bentoml, which reads it once.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One real training run on 40 images per class of the built-in set, one epoch, exported and
    published to the test model store. Shared by every test that needs a trained model."""
    output = tmp_path_factory.mktemp("artifacts")
    result = run_training_cli(
        "--max-per-class", "40", "--epochs", "1", "--output", str(output), "--name", "tiny"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {"output": output, "folder": (output / "tiny" / "latest").resolve(), "result": result}


@pytest.fixture(scope="session")
def server(tiny_run):
    """The service on the tiny model, with the production worker count and a small body limit."""
    with bentoml_server(
        tiny_run["folder"], workers=2, MAX_REQUEST_BYTES=str(8 * 1024 * 1024)
    ) as url:
        yield url


@pytest.fixture(scope="session")
def offline(tiny_run):
    """The tiny model run in-process by onnxruntime: what every answer must equal."""
    from service.core.classifier import ModelSource, load_classifier

    return load_classifier(ModelSource(tiny_run["folder"], "test"))


@pytest.fixture(scope="session")
def outlier_image(offline) -> bytes:
    """An image that no class covers and that the tiny model's detector flags (checked here,
    offline): the least familiar of uniform noise, a white image and a real photo."""
    from pathlib import Path

    import numpy as np
    from sklearn.datasets import images as sklearn_images

    from tests.helpers import encode_image

    rng = np.random.default_rng(0)
    candidates = [encode_image(rng.integers(0, 256, (28, 28), dtype=np.uint8), "PNG")]
    candidates.append(encode_image(np.full((28, 28), 255, dtype=np.uint8), "PNG"))
    candidates.append((Path(sklearn_images.__file__).parent / "china.jpg").read_bytes())
    scores = [
        float(offline.predict(offline.preprocess(c)[np.newaxis]).ood_scores[0]) for c in candidates
    ]
    best = int(np.argmax(scores))
    assert scores[best] > offline.contract.ood_threshold, (scores, offline.contract.ood_threshold)
    return candidates[best]
