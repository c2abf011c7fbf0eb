"""A training run that is stopped loses nothing: SIGTERM keeps the last completed epoch, --resume
continues from it, and a kill during export or while the model store is written leaves the
previous `latest` intact, in the artifact folder and in the store."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.core.classifier import ModelSource, load_classifier
from tests.helpers import ROOT
from training.cli import ExitCode

pytestmark = [pytest.mark.slow]

OPTIONS = [
    "--max-per-class",
    "30",
    "--epochs",
    "4",
    "--early-stopping-patience",
    "0",
    "--no-publish",
    "--name",
    "r",
    # The data audit is tested on its own (test_audit_jobs): here it would only add minutes.
    "--audit",
    "off",
]


def start(output, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "training", *OPTIONS, "--output", str(output), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # No PYTHONUNBUFFERED: the epoch lines must come through a pipe as they happen.
        env={name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"},
    )


def signal_when(process: subprocess.Popen, marker: str, number: int) -> str:
    """Send ``number`` when a line starting with ``marker`` appears; return all output."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(marker) and process.poll() is None:
            process.send_signal(number)
    process.wait(timeout=300)
    return "".join(lines)


def versions(model_dir) -> list:
    return sorted(path.name for path in model_dir.iterdir() if path.name[0].isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One uninterrupted run of OPTIONS, published: the run a resumed one must equal, and the
    previous `latest` (in the artifact folder and in the store) that a killed run must keep."""
    output = tmp_path_factory.mktemp("finished")
    uninterrupted = start(output, "--publish")
    log = uninterrupted.communicate(timeout=300)[0]
    assert uninterrupted.returncode == 0, log[-2000:]
    return output


def test_sigterm_keeps_the_state_and_resume_finishes_like_an_uninterrupted_run(finished, tmp_path):
    output = tmp_path / "stopped"
    log = signal_when(start(output), "Epoch 3/", signal.SIGTERM)
    assert "stopped by SIGTERM" in log and "--resume" in log, log[-2000:]
    assert "Traceback" not in log
    model_dir = output / "r"
    assert versions(model_dir) == [] and not (model_dir / "latest").exists()
    assert (model_dir / ".backup" / "history.csv").read_text().count("\n") == 3  # header + 2

    resumed = start(output, "--resume")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-2000:]
    assert "resuming the interrupted run" in log and "Epoch 1/4" not in log and "Epoch 3/4" in log
    assert not (model_dir / ".backup").exists()

    whole = json.loads((finished / "r" / "latest" / "metadata.json").read_text())
    after = json.loads((model_dir / "latest" / "metadata.json").read_text())
    history = json.loads((model_dir / "latest" / "history.json").read_text())
    assert len(history["loss"]) == 4  # the epochs before the stop are part of the run
    assert after["training"]["epochs_run"] == whole["training"]["epochs_run"] == 4
    # Same seed, same data: the same result within the noise of a tiny run.
    assert abs(after["metrics"]["test_accuracy"] - whole["metrics"]["test_accuracy"]) <= 0.15
    whole_loss = json.loads((finished / "r" / "latest" / "history.json").read_text())
    assert history["loss"][-1] == pytest.approx(whole_loss["loss"][-1], rel=0.3)


def test_resume_refuses_a_backup_of_other_options(tmp_path):
    log = signal_when(start(tmp_path), "Epoch 2/", signal.SIGTERM)
    assert "stopped by SIGTERM" in log
    other = start(tmp_path, "--resume", "--learning-rate", "0.01")
    log = other.communicate(timeout=300)[0]
    assert other.returncode == ExitCode.USAGE and "other options" in log


def test_a_kill_during_export_leaves_the_previous_latest_intact(finished, tmp_path):
    shutil.copytree(finished / "r", tmp_path / "r", symlinks=True)
    model_dir = tmp_path / "r"
    (before,) = versions(model_dir)

    log = signal_when(start(tmp_path, "--epochs", "1"), "parity gate", signal.SIGKILL)
    assert "parity gate" in log
    assert versions(model_dir) == [before]
    latest = (model_dir / "latest").resolve()
    assert latest.name == before
    classifier = load_classifier(ModelSource(latest, "previous latest"))
    assert classifier.version == before


# Runs the training CLI with one change: each file BentoML's publishing step copies into the
# store's temporary model folder is followed by a pause, so that the test can kill the process
# while the store is being written, every time.
SLOW_PUBLISHING = """
import runpy, shutil, sys, time
import training.export.publish

class SlowCopies:
    def __getattr__(self, name):
        return getattr(shutil, name)

    @staticmethod
    def copy2(source, target):
        copied = shutil.copy2(source, target)
        print(f"copied {source} into the store", flush=True)
        time.sleep(60)
        return copied

training.export.publish.shutil = SlowCopies()
runpy.run_module("training", run_name="__main__", alter_sys=True)
"""


def test_a_kill_while_the_store_is_written_leaves_its_latest_the_previous_model(finished, tmp_path):
    import bentoml

    previous = bentoml.models.get("r:latest")  # published by the finished run

    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_PUBLISHING, *OPTIONS, "--output", str(tmp_path)]
        + ["--epochs", "1", "--publish"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"},
    )
    log = signal_when(process, "copied ", signal.SIGKILL)
    assert "publishing r:" in log and "copied " in log, log[-2000:]
    assert process.returncode == -signal.SIGKILL

    # The store holds the previous model alone, still its latest, and it still serves.
    assert [str(model.tag) for model in bentoml.models.list("r")] == [str(previous.tag)]
    latest = bentoml.models.get("r:latest")
    assert str(latest.tag) == str(previous.tag)
    classifier = load_classifier(ModelSource(Path(latest.path), str(latest.tag)))
    assert classifier.version == previous.tag.version and classifier.num_classes == 10
