"""The data audit as a user runs it: ``python -m training audit`` on a folder and on the built-in
set, and the training job's ``--audit fail`` and ``--audit warn`` on a folder with a picture
filed under two labels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.audit_faults import write_planted_folder
from tests.helpers import ROOT, run_training_cli, shape_image, write_class_folder
from training.cli import ExitCode

pytestmark = pytest.mark.slow
CLASSES = {"square": 0, "hbar": 1, "vbar": 2}
TINY = ("--epochs", "1", "--no-export", "--no-publish", "--image-size", "24")


@pytest.fixture(scope="module")
def conflicting(tmp_path_factory):
    """A folder where one picture is filed under two labels."""
    folder = write_class_folder(tmp_path_factory.mktemp("conflict"), CLASSES, per_class=20)
    shutil.copy(folder / "square" / "square_001.jpg", folder / "hbar" / "copy_of_square.jpg")
    return folder


def test_audit_fail_stops_in_one_line(conflicting, tmp_path):
    result = run_training_cli("--data", str(conflicting), "--audit", "fail",
                              "--output", str(tmp_path), *TINY)  # fmt: skip
    assert result.returncode == ExitCode.DATA, result.stdout + result.stderr
    # TensorFlow's own start-up lines go to stderr too; the job's is one line, the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert errors[0].startswith(
        "error: the data audit found 1 group(s) of duplicates filed under different labels"
    )
    lines = errors
    assert "hbar/copy_of_square.jpg" in lines[0] and "Traceback" not in result.stderr
    report = tmp_path / "animals" / "failed-audit" / "report.json"
    assert json.loads(report.read_text())["label_conflicts"]
    assert not (tmp_path / "animals" / "latest").exists()


def test_audit_warn_trains_and_keeps_the_report(conflicting, tmp_path):
    result = run_training_cli("--data", str(conflicting), "--output", str(tmp_path),
                              "--drop-duplicates", *TINY)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "duplicate groups under different labels 1" in result.stdout
    audit = tmp_path / "animals" / "latest" / "audit"
    report = json.loads((audit / "report.json").read_text())
    assert len(report["label_conflicts"]) == 1 and len(report["dropped_duplicates"]) == 1
    assert report["label_issues"]["suspects"] is not None
    assert {"report.md", "relabel.csv", "duplicates.png"} <= {p.name for p in audit.iterdir()}
    metadata = json.loads((tmp_path / "animals" / "latest" / "metadata.json").read_text())
    assert sum(metadata["data"]["splits"].values()) == 60  # 61 images, one copy dropped


def test_the_audit_command_finds_planted_label_errors(tmp_path):
    """The quick model's out-of-fold probabilities find labels flipped on purpose."""
    rng = np.random.default_rng(0)
    names = np.repeat(list(CLASSES), 60)
    pixels = np.stack([shape_image(CLASSES[name], 32, False, rng) for name in names])
    record = write_planted_folder(tmp_path / "data", pixels, names, flip=0.05, copies=0.0,
                                  exact_copies=0, outliers=0)  # fmt: skip
    result = run_training_cli("audit", "--data", str(tmp_path / "data"),
                              "--output", str(tmp_path / "audit"), "--epochs", "8")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "report: " in result.stdout
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    suspects = [row["file"] for row in report["label_issues"]["suspects"]]
    found = set(suspects[: 2 * len(record["flipped"])]) & set(record["flipped"])
    assert len(found) >= 0.7 * len(record["flipped"]), (suspects, record["flipped"])
    rows = (tmp_path / "audit" / "relabel.csv").read_text().splitlines()
    assert rows[0].startswith("file,given,suggested") and len(rows) == len(suspects) + 1
    assert {row["file"] for row in report["unreadable"]} == set(record["corrupt"])


def test_a_run_on_the_built_in_set_keeps_its_audit(tmp_path):
    """A training run with the default audit on the built-in set (40 images a class) carries its
    audit (the session's tiny model trains without one, to save its time for every test)."""
    result = run_training_cli(
        "--max-per-class", "40", "--epochs", "1", "--no-export", "--no-publish",
        "--output", str(tmp_path), "--name", "audited",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    folder = tmp_path / "audited" / "latest"
    report = json.loads((folder / "audit" / "report.json").read_text())
    assert report["source"].startswith("animal-mnist") and report["images"] == 400
    assert report["label_issues"]["method"].startswith("confident learning")
    assert (folder / "audit" / "report.md").is_file()


def test_make_audit_on_the_built_in_set(tmp_path):
    """``make audit`` with the checks that need no model, on 100 images of each class."""
    import subprocess

    result = subprocess.run(
        ["make", "audit", f"AUDIT_OUTPUT={tmp_path}",
         "AUDIT_ARGS=--max-per-class 100 --no-label-issues"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit of animal-mnist==0.4: 1000 images, 10 classes" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["label_issues"] is None and report["class_counts"]["zebra"] == 100
