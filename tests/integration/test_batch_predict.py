"""Batch inference that scales out: shards chosen by a stable hash, part files that survive a
kill, --resume, and merge. Real CLI processes on a real model, no server."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, encode_image, write_class_folder

pytestmark = [pytest.mark.slow]


def predict_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.predict", *args]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        predict_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def part_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(newline="")))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three class folders (named after classes of the model) of mixed formats, plus one corrupt
    file."""
    root = write_class_folder(
        tmp_path_factory.mktemp("batch") / "images", {"bear": 0, "cat": 1, "zebra": 2}, per_class=14
    )
    (root / "bear" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """2,000 small PNGs: enough that a run with one image per batch is still going when it is
    stopped."""
    root = tmp_path_factory.mktemp("many") / "images"
    rng = np.random.default_rng(0)
    for index in range(2000):
        folder = root / f"d{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        (folder / f"{index:05d}.png").write_bytes(encode_image(pixels, "PNG"))
    return root


def test_shards_together_classify_every_file_exactly_once(tiny_run, labelled, tmp_path):
    out = tmp_path / "parts"
    model = str(tiny_run["folder"])
    processes = [
        subprocess.Popen(
            predict_command(
                str(labelled), "--model", model, "--shard", f"{i}/3", "--format", "csv",
                "--output", str(out),
            ),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(3)
    ]  # fmt: skip
    results = [process.communicate(timeout=300) for process in processes]
    # The corrupt file is a row of its shard's part; no shard process fails for it.
    assert [process.returncode for process in processes] == [0, 0, 0], results
    every = sorted(str(path) for path in labelled.rglob("*") if path.is_file())
    parts = [part_rows(out / f"part-{i:05d}-of-00003.csv") for i in range(3)]
    assert all(parts), "each of 3 shards of 43 files holds some"
    union = sorted(row["path"] for rows in parts for row in rows)
    assert union == every  # every file exactly once
    for index, rows in enumerate(parts):
        assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
        summary = json.loads((out / f"part-{index:05d}-of-00003.json").read_text())
        assert summary["shard"] == f"{index}/3" and summary["files"] == len(rows)
    assert not list(out.glob(".*partial"))
    # The same shard again picks the same files: the hash is stable across runs.
    again = run(str(labelled), "--model", model, "--shard", "1/3", "--format", "csv",
                "--output", str(tmp_path / "again"))  # fmt: skip
    assert part_rows(tmp_path / "again" / "part-00001-of-00003.csv") == parts[1], again.stderr

    merged = run("merge", str(out), "--output", str(tmp_path / "all.csv"), "--evaluate")
    assert merged.returncode == 0, merged.stderr
    rows = part_rows(tmp_path / "all.csv")
    assert [row["path"] for row in rows] == every
    assert "merged 3 shards" in merged.stdout and "42 classified, 1 failed" in merged.stdout
    assert "accuracy" in merged.stdout and "confusion matrix" in merged.stdout


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_shard_resumes_with_nothing_lost_or_twice(tiny_run, many, tmp_path, how):
    model = str(tiny_run["folder"])
    args = [str(many), "--model", model, "--shard", "0/2", "--format", "jsonl",
            "--output", str(tmp_path), "--batch-size", "1"]  # fmt: skip
    partial = tmp_path / ".part-00000-of-00002.jsonl.partial"
    final = tmp_path / "part-00000-of-00002.jsonl"
    process = subprocess.Popen(
        predict_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.read_bytes().count(b"\n") >= 50):
        assert process.poll() is None and time.monotonic() < deadline, "it ended too soon"
        time.sleep(0.01)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert not final.exists()  # stopped part-way: no part file yet
    if how == signal.SIGTERM:
        # Stopped cleanly after the batch in progress, saying how to continue.
        assert process.returncode == 143 and b"--resume" in stderr
        assert partial.read_bytes().endswith(b"\n")
    kept = partial.read_bytes().count(b"\n")
    resumed = run(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    rows = [json.loads(line) for line in final.read_text().splitlines()]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths))  # nothing twice
    clean = run(str(many), "--model", model, "--shard", "0/2", "--format", "jsonl",
                "--output", str(tmp_path / "clean"))  # fmt: skip
    assert clean.returncode == 0, clean.stderr
    expected = [
        json.loads(line) for line in (tmp_path / "clean" / final.name).read_text().splitlines()
    ]
    assert sorted(paths) == sorted(row["path"] for row in expected)  # nothing lost
    assert kept >= 50 and len(paths) > kept


def test_merge_refuses_a_missing_shard_and_names_it(tiny_run, labelled, tmp_path):
    model = str(tiny_run["folder"])
    for index in (0, 2):
        run(str(labelled), "--model", model, "--shard", f"{index}/3", "--format", "csv",
            "--output", str(tmp_path))  # fmt: skip
    merged = run("merge", str(tmp_path))
    assert merged.returncode == 2
    assert "1 of 3 shards missing or incomplete" in merged.stderr and ": 1/3;" in merged.stderr
    assert "Traceback" not in merged.stderr
    assert not (tmp_path / "merged.csv").exists()


def test_shard_options_that_cannot_work_are_one_line_errors(tiny_run, labelled):
    model = str(tiny_run["folder"])
    for args, message in [
        (["--shard", "3/3", "--output", "x"], "expected I/N with 0 <= I < N"),
        (["--shard", "0/2"], "--shard needs --output FOLDER"),
        (["--shard", "0/2", "--output", "x", "--format", "table"], "writes csv or jsonl"),
        (["--resume"], "--resume needs --output"),
    ]:
        result = run(str(labelled), "--model", model, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_the_indexed_job_commands_run_every_shard_and_merge(tiny_run, labelled, tmp_path):
    """k8s/batch-predict as a cluster would run it: the Job's own command once per completion
    index (with the volumes' paths mapped here), then the merge Job's command."""
    import os

    import yaml

    folder = ROOT / "k8s" / "batch-predict"
    job = yaml.safe_load((folder / "job.yaml").read_text())
    spec, (container,) = job["spec"], job["spec"]["template"]["spec"]["containers"]
    deployment = yaml.safe_load((ROOT / "k8s" / "base" / "deployment.yaml").read_text())
    (served,) = deployment["spec"]["template"]["spec"]["containers"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    shards = int(next(e["value"] for e in container["env"] if e["name"] == "SHARDS"))
    assert shards == spec["completions"] >= spec["parallelism"]
    assert container["image"] == served["image"]  # the serving image, no TensorFlow
    assert container["resources"] == served["resources"]
    assert container["securityContext"] == served["securityContext"]
    assert (
        job["spec"]["template"]["spec"]["securityContext"]
        == deployment["spec"]["template"]["spec"]["securityContext"]
    )
    mapped = {
        "/data/images": str(labelled),
        "/data/results": str(tmp_path / "results"),
        "/artifacts/animals/latest": str(tiny_run["folder"]),
        "exec python": f"exec {sys.executable}",
    }
    script = container["args"][0]
    for inside, here in mapped.items():
        assert inside in script
        script = script.replace(inside, here)
    for index in range(3):  # three shards here, as SHARDS=3 would give
        environment = {**os.environ, "JOB_COMPLETION_INDEX": str(index), "SHARDS": "3"}
        result = subprocess.run(
            ["sh", "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr  # failed files are rows, not pod failures
    merge = yaml.safe_load((folder / "merge-job.yaml").read_text())
    (merger,) = merge["spec"]["template"]["spec"]["containers"]
    command = [mapped.get(part, part) for part in merger["command"]]
    assert command[:4] == ["python", "-m", "service.predict", "merge"]
    result = subprocess.run(
        [sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "merged 3 shards" in result.stdout and "1 failed" in result.stdout
    rows = part_rows(tmp_path / "results" / "merged.csv")
    assert sorted(row["path"] for row in rows) == sorted(
        str(path) for path in labelled.rglob("*") if path.is_file()
    )


def test_decoding_in_processes_gives_the_rows_of_decoding_in_process(tiny_run, labelled, tmp_path):
    outputs = []
    for decoders in ("2", "1"):
        output = tmp_path / f"decoders-{decoders}.csv"
        model = str(tiny_run["folder"])
        result = run(str(labelled), "--model", model, "--format", "csv", "--output", str(output),
                     "--decoders", decoders, "--batch-size", "8")  # fmt: skip
        assert result.returncode == 1, result.stderr  # the corrupt file, as a row
        assert f"{decoders} decoding processes" in result.stdout
        outputs.append(output.read_text())
    assert outputs[0] == outputs[1]
    rows = list(csv.DictReader(outputs[0].splitlines()))
    assert len(rows) == 43
    assert [row["path"].endswith("corrupt.png") for row in rows if row["error"]] == [True]


def test_a_part_left_without_its_summary_is_completed_by_resume(tiny_run, labelled, tmp_path):
    """A shard stopped between its part's rename and its summary: merge counts that shard as
    incomplete, and --resume writes the summary from the part without classifying again."""
    args = [str(labelled), "--model", str(tiny_run["folder"]), "--format", "csv",
            "--output", str(tmp_path)]  # fmt: skip
    for index in range(2):
        assert run(*args, "--shard", f"{index}/2").returncode == 0
    summary = tmp_path / "part-00001-of-00002.json"
    written = json.loads(summary.read_text())
    summary.unlink()
    refused = run("merge", str(tmp_path))
    assert refused.returncode == 2 and ": 1/2;" in refused.stderr
    resumed = run(*args, "--shard", "1/2", "--resume")
    assert resumed.returncode == 0 and "already complete" in resumed.stdout
    assert json.loads(summary.read_text()) == written
    assert run("merge", str(tmp_path)).returncode == 0
