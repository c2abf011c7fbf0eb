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
