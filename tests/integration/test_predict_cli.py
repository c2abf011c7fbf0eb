"""Offline inference from the command line: the same answers as the service, without a server."""

import csv
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.helpers import ROOT, encode_image, write_class_folder

pytestmark = [pytest.mark.slow]


def run_predict(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "service.predict", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_csv_rows_equal_the_service_answers_and_failures_are_counted(tiny_run, server, tmp_path):
    folder = write_class_folder(tmp_path / "mixed", {"a": 0, "b": 1}, per_class=6)
    noise = encode_image(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8), "PNG")
    (folder / "a" / "corrupt.png").write_bytes(noise[: len(noise) // 2])  # truncated
    result = run_predict(
        str(folder),
        "--model",
        str(tiny_run["folder"]),
        "--format",
        "csv",
        "--output",
        str(tmp_path / "out.csv"),
    )
    assert result.returncode == 1, result.stderr  # one file failed
    assert "12 classified, 1 failed" in result.stdout + result.stderr
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(rows) == 13
    (broken,) = [row for row in rows if row["error"]]
    assert broken["path"].endswith("corrupt.png") and broken["error"].startswith("corrupt_image")
    for row in rows:
        if row["error"]:
            continue
        path = row["path"]
        with open(path, "rb") as handle:
            answer = httpx.post(f"{server}/classify", files={"image": (path, handle.read())}).json()
        assert row["label"] == answer["label"]
        assert row["unknown"] == str(answer["unknown"]).lower()
        assert float(row["ood_score"]) == pytest.approx(answer["ood_score"], rel=1e-4)
        assert float(row["score"]) == pytest.approx(answer["score"], abs=1e-6)
        assert [entry.split(":")[0] for entry in row["top_k"].split(";")] == [
            entry["label"] for entry in answer["top_k"]
        ]


def test_jsonl_and_evaluate_on_a_labelled_folder(tiny_run, tmp_path):
    from service.core.classifier import ModelSource, load_classifier
    from training.data.sources import load_animals

    animals = load_animals()
    classes = ["bear", "cat", "zebra"]
    expected_correct, total = 0, 0
    offline = load_classifier(ModelSource(tiny_run["folder"], "test"))
    for name in classes:
        (tmp_path / "labelled" / name).mkdir(parents=True)
        for index in np.flatnonzero(animals.names == name)[-5:]:
            data = encode_image(animals.pixels[index], "PNG")
            (tmp_path / "labelled" / name / f"{index}.png").write_bytes(data)
            predictions = offline.classify(offline.preprocess(data)[None], 1).predictions
            expected_correct += offline.labels[int(predictions.probabilities.argmax())] == name
            total += 1
    result = run_predict(
        str(tmp_path / "labelled"),
        "--model",
        str(tiny_run["folder"]),
        "--format",
        "jsonl",
        "--evaluate",
        "--top-k",
        "2",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == total and all(len(row["top_k"]) == 2 for row in rows)
    assert f"accuracy {expected_correct / total:.4f} on {total} images" in result.stderr
    assert "confusion matrix" in result.stderr


def test_evaluate_counts_the_unknown_and_the_table_marks_them(
    tiny_run, offline, outlier_image, tmp_path
):
    from training.data.sources import load_animals

    animals = load_animals()
    folder = tmp_path / "labelled" / "zebra"
    folder.mkdir(parents=True)
    for index in np.flatnonzero(animals.names == "zebra")[-6:]:
        (folder / f"{index}.png").write_bytes(encode_image(animals.pixels[index], "PNG"))
    (folder / "outlier.png").write_bytes(outlier_image)
    paths = sorted(folder.iterdir())
    verdicts = offline.classify(
        np.stack([offline.preprocess(path.read_bytes()) for path in paths]), 1
    ).predictions.unknown
    flagged = int(verdicts.sum())
    assert flagged >= 1  # the outlier, at least
    result = run_predict(
        str(tmp_path / "labelled"), "--model", str(tiny_run["folder"]), "--evaluate"
    )
    assert result.returncode == 0, result.stderr
    assert f"unknown: {flagged} of 7 images" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if ".png" in line}
    outlier_line = lines[str(folder / "outlier.png")]
    assert outlier_line.split()[1] == "unknown" and "!" in outlier_line.split()[3]
    raw = run_predict(
        str(folder / "outlier.png"), "--model", str(tiny_run["folder"]), "--no-unknown-label"
    )
    assert raw.returncode == 0, raw.stderr
    (line,) = [line for line in raw.stdout.splitlines() if "outlier.png" in line]
    assert line.split()[1] in offline.labels and "!" in line.split()[3]


def test_a_missing_model_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(encode_image(np.zeros((8, 8), np.uint8), "PNG"))
    result = run_predict(str(tmp_path), "--model", "nosuchmodel:latest")
    assert result.returncode == 2
    assert "nosuchmodel:latest is not in the BentoML model store" in result.stderr
    assert "Traceback" not in result.stderr
