"""Shared fixtures: a throw-away model store, and a tiny model trained once per test session and
served by a real ``bentoml serve``.

The suite runs on pytest-xdist's workers (``make test``: ``-n 2 --dist loadfile``): a module's
tests run on one worker, so that a fixture of the module (a trained model, a built image, a
started server) is made once. Each worker has a model store of its own, and the session's tiny
model is trained once for all of them: the first worker trains it, the others wait on a file
lock and take a copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
from filelock import FileLock

from tests.helpers import bentoml_server, run_training_cli


def pytest_configure(config):
    # Every model-store write of the tests goes to a throw-away store, never the user's.
    # Set before anything imports bentoml, which reads it once.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# The modules that take longest, longest first (the README's "Development" figures): xdist hands
# the modules out in collection order (make test: --no-loadscope-reorder), so these start first,
# and the short ones fill in at the end. The second needs no trained model: it runs while the
# first trains the session's tiny model.
LONGEST_FIRST = (
    "test_container.py",
    "test_training_resilience.py",
    "test_benchmarks.py",
    "test_distributed_training.py",
    "test_audit_jobs.py",
    "test_backbone_training.py",
    "test_training_job.py",
    "test_feedback_loop.py",
    "test_rollout.py",
    "test_replicas.py",
    "test_explanations.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


def _shared_folder(tmp_path_factory):
    """A folder every xdist worker of this run sees (the run's base temporary folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One real training run on 40 images per class of the built-in set, one epoch, exported and
    published to the test model store. Shared by every test that needs a trained model.

    Trained once per test run: the first worker to ask trains it and exports the published
    model; every worker then takes its own copy of the artifact folder and imports the model into
    its own store, so that no test sees another worker's changes."""
    import bentoml

    shared = _shared_folder(tmp_path_factory)
    trained, record = shared / "tiny-trained", shared / "tiny-trained.json"
    with FileLock(str(shared / "tiny-trained.lock")):
        trained_here = not record.is_file()
        if trained_here:
            result = run_training_cli(
                "--max-per-class", "40", "--epochs", "1", "--output", str(trained),
                "--name", "tiny", "--audit", "off",  # tested on its own (test_audit_jobs)
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            bentoml.models.export_model("tiny:latest", str(shared / "tiny.bentomodel"))
            fields = {"args": result.args, "returncode": 0, "stdout": result.stdout}
            record.write_text(json.dumps({**fields, "stderr": result.stderr}))
    output = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(trained, output, symlinks=True, dirs_exist_ok=True)
    if not trained_here:  # the training published it to this worker's store
        bentoml.models.import_model(str(shared / "tiny.bentomodel"))
    result = subprocess.CompletedProcess(**json.loads(record.read_text()))
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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for this worker's tests (benchmarks/postgres.py); each test takes a
    database of its own with ``postgres.new_database()``. A test that stops its server starts
    one of its own."""
    from benchmarks.postgres import Postgres

    server = Postgres()
    yield server
    server.close()
