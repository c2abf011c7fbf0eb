"""``python -m training drift``: a real SQLite prediction log (the project's migrations) and a
real tiny ONNX model, tested against a reference built as a training run builds it. Rows drawn
like the reference are called clean; rows with lower top-1 scores, higher unknown-input scores
and one class three times as common are called drifted, and the class is named."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import insert

from service.core.contract import INPUT_NAME, OUTPUT_NAME, ModelContract
from service.core.drift import REFERENCE_FILE, build_reference
from service.core.preprocessing import ImageSpec
from service.store.database import create_engine, database_url, migrate
from service.store.schema import labels, predictions
from tests.helpers import encode_image
from training import artifacts
from training.command_config import DriftConfig
from training.config import ConfigError
from training.data.sources import DataError
from training.quality.drift_report import CONFIDENCE, format_drift, run_drift

LABELS = ("cat", "dog", "other")
VERSION = "20260101-000000"
OOD_OUTPUT = "unknown_score"
PNG = b"\x89PNG\r\n\x1a\n"


def contract(**changes) -> ModelContract:
    fields = dict(
        name="animals",
        version=VERSION,
        labels=LABELS,
        image=ImageSpec(8, 8, 3),
        ood_output_name=OOD_OUTPUT,
        ood_threshold=2.0,
        drift_reference=REFERENCE_FILE,
    )
    return ModelContract(**{**fields, **changes})


def draw(rng, count: int, shifted: bool = False):
    """Synthetic calibrated outputs: each row's true class, its Dirichlet scores peaked on it
    (flatter when shifted), and an unknown-input score (higher when shifted); when shifted,
    ``dog`` is three times as common."""
    priors = np.array([1, 3, 1]) / 5 if shifted else np.full(3, 1 / 3)
    truth = rng.choice(3, count, p=priors)
    peak = 2.5 if shifted else 12.0
    concentration = np.ones((count, 3))
    concentration[np.arange(count), truth] = peak
    draws = rng.gamma(concentration)  # Dirichlet rows: gamma draws, normalised
    probabilities = (draws / draws.sum(axis=1, keepdims=True)).astype(np.float32)
    ood = rng.normal(1.6 if shifted else 1.0, 0.2, count).astype(np.float32)
    return probabilities, truth, ood


def write_artifact(folder: Path, seed: int = 0, reference: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    artifacts.write_json(folder / "metadata.json", contract().to_metadata())
    if reference:
        probabilities, truth, ood = draw(rng, 2000)
        build_reference(probabilities, truth, ood, rng.choice(3, 3000)).save(
            folder / REFERENCE_FILE
        )
    return folder


def write_log(url: str, rows: list[tuple], label_every: int = 2) -> None:
    """``rows`` of ``(at, probabilities, truth, ood, version)`` into the log, every
    ``label_every``-th with its true label (the first one labelled as a new class)."""
    engine = create_engine(database_url(url, Path(".")))
    migrate(engine)
    logged, labelled = [], []
    for number, (at, scores, truth, ood, version) in enumerate(rows):
        request_id = uuid.uuid4().hex
        order = np.argsort(-scores)
        logged.append(
            {
                "request_id": request_id,
                "at": at,
                "endpoint": "classify",
                "model_name": "animals",
                "model_version": version,
                "top_k": [{"label": LABELS[i], "score": float(scores[i])} for i in order],
                "predicted": LABELS[order[0]],
                "verdict": LABELS[order[0]] if ood <= 2.0 else "unknown",
                "score": float(scores[order[0]]),
                "ood_score": float(ood),
                "input_digest": "0" * 32,
                "input_bytes": 100,
                "captured": False,
                "latency_ms": 1.0,
            }
        )
        if number % label_every == 0:
            labelled.append(
                {
                    "request_id": request_id,
                    "label": "zebra" if number == 0 else LABELS[truth],
                    "new_class": number == 0,
                    "first_received_at": at + 1,
                    "received_at": at + 1,
                }
            )
    with engine.begin() as connection:
        connection.execute(insert(predictions), logged)
        connection.execute(insert(labels), labelled)
    engine.dispose()


@pytest.fixture
def drifting_log(tmp_path):
    """600 clean predictions, then 600 drifted ones, of the artifact's version in the last hour;
    and, to be left out, older ones and another version's."""
    rng = np.random.default_rng(1)
    now = time.time()
    rows = []
    for shifted in (False, True):
        for scores, truth, ood in zip(*draw(rng, 600, shifted), strict=True):
            rows.append((now - 3600 + len(rows), scores, truth, ood, VERSION))
    for scores, truth, ood in zip(*draw(rng, 300, True), strict=True):
        rows.append((now - 40 * 86400, scores, truth, ood, VERSION))  # before --since
        rows.append((now - 60, scores, truth, ood, "another-version"))
    url = f"sqlite:///{tmp_path / 'log' / 'predictions.sqlite3'}"
    write_log(url, rows)
    return url


def test_the_log_report_tells_clean_windows_from_drifted_ones(tmp_path, drifting_log):
    artifact = write_artifact(tmp_path / "artifact")
    output = tmp_path / "report"
    config = DriftConfig(artifact=artifact, database=drifting_log, since="1d", output=output)
    figures = run_drift(config)

    windows = figures["windows"]
    assert [window["images"] for window in windows] == [200] * 6  # the others are left out
    assert [window["drift"] for window in windows] == [False] * 3 + [True] * 3
    assert set(figures["tests"]) == {CONFIDENCE, "knn", "label"}
    assert "bbsd" in figures["absent"]
    for window in windows[3:]:
        assert set(window["tests_fired"]) == {CONFIDENCE, "knn", "label"}
    assert figures["drifted_windows"] == 3 and figures["drifted_share"] == 0.5
    overall = figures["overall"]
    assert overall["drift"]
    assert overall["moved_classes"][0]["label"] == "dog"
    assert overall["moved_classes"][0]["share"] > overall["moved_classes"][0]["reference_share"]
    # Labels: every second prediction; the new-class label is not counted.
    assert overall["labelled"] == 599
    assert [window["labelled"] for window in windows] == [99] + [100] * 5
    for window in windows:
        assert 0 <= window["accuracy"] <= 1
        assert set(window["estimate_error"]) == {"atc", "mean_confidence"}
    # On clean windows the estimates are close to the live accuracy; lower once drifted.
    assert all(window["estimate_error"]["atc"] < 0.1 for window in windows[:3])
    assert windows[5]["estimated_accuracy"]["atc"] < windows[0]["estimated_accuracy"]["atc"]

    text = format_drift(figures)
    assert "validation accuracy" in text and "ATC threshold" in text
    assert "test bbsd is absent" in text
    assert "drifted windows: 3 of 6 (50%)" in text
    assert "  dog: " in text and "what to do:" in text
    assert "labelled (error ATC" in text
    for name in ("drift_score.png", "distributions.png"):
        assert (output / name).read_bytes().startswith(PNG)
    stored = json.loads((output / "drift.json").read_text())
    assert stored["drifted_windows"] == 3
    assert stored["overall"]["moved_classes"][0]["label"] == "dog"
    assert stored["source"]["model_version"] == VERSION


def test_a_clean_log_says_no_drift_and_nothing_to_change(tmp_path):
    rng = np.random.default_rng(2)
    now = time.time()
    rows = [
        (now - 600 + i, scores, truth, ood, VERSION)
        for i, (scores, truth, ood) in enumerate(zip(*draw(rng, 480), strict=True))
    ]
    url = f"sqlite:///{tmp_path / 'predictions.sqlite3'}"
    write_log(url, rows)
    artifact = write_artifact(tmp_path / "artifact")
    figures = run_drift(DriftConfig(artifact=artifact, database=url, output=tmp_path / "out"))
    # 480 = 200 + 280: a last window of less than half a window joins the one before it.
    assert [window["images"] for window in figures["windows"]] == [200, 280]
    assert not any(window["drift"] for window in figures["windows"])
    assert not figures["overall"]["drift"] and figures["overall"]["moved_classes"] == []
    assert figures["advice"][0].startswith("nothing to change")


def test_a_missing_reference_is_one_line_that_says_train_again(tmp_path, drifting_log):
    artifact = write_artifact(tmp_path / "old", reference=False)
    config = DriftConfig(artifact=artifact, database=drifting_log, output=tmp_path / "out")
    with pytest.raises(FileNotFoundError) as caught:
        run_drift(config)
    message = str(caught.value)
    assert "\n" not in message and REFERENCE_FILE in message and "train again" in message
    assert not (tmp_path / "out").exists()


def test_the_command_prints_the_report_or_one_error_line(tmp_path, drifting_log, capsys):
    from training.cli import ExitCode, parse
    from training.commands import run_command  # loads TensorFlow, as the command does

    def run(*argv: str) -> tuple[int, str, str]:
        status = run_command(*parse(["drift", *argv]))
        out, err = capsys.readouterr()
        return status, out, err

    artifact = write_artifact(tmp_path / "artifact")
    status, out, err = run(
        "--artifact", str(artifact), "--database", drifting_log, "--since", "1d",
        "--output", str(tmp_path / "report"),
    )  # fmt: skip
    assert status == ExitCode.OK and err == ""
    assert "drifted windows: 3 of 6 (50%)" in out and "drift.json" in out
    old = write_artifact(tmp_path / "old", reference=False)
    status, out, err = run("--artifact", str(old), "--database", drifting_log)
    assert status == ExitCode.MODEL and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert REFERENCE_FILE in err and "train again" in err
    status, _, err = run("--artifact", str(artifact), "--database", "", "--window", "5")
    assert status == ExitCode.USAGE and err.count("\n") == 1 and "--window" in err


def test_no_source_and_an_empty_period_are_one_line_each(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    artifact = write_artifact(tmp_path / "artifact")
    with pytest.raises(ConfigError, match="--database or --folder"):
        run_drift(DriftConfig(artifact=artifact))
    url = f"sqlite:///{tmp_path / 'predictions.sqlite3'}"
    rng = np.random.default_rng(3)
    old = [
        (time.time() - 30 * 86400, s, t, o, VERSION) for s, t, o in zip(*draw(rng, 5), strict=True)
    ]
    write_log(url, old)
    with pytest.raises(DataError) as caught:
        run_drift(DriftConfig(artifact=artifact, database=url, since="1d"))
    assert "no predictions of model version" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- a folder of images, classified by a real (tiny) ONNX model ------------------------------


def colour_model() -> onnx.ModelProto:
    """A real ONNX classifier of 8x8 colour images: each class's logit is its channel's mean
    brightness, the unknown-input score the image's distance from mid-grey."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [INPUT_NAME], ["means"], axes=[1, 2], keepdims=0),
            helper.make_node("Mul", ["means", "scale"], [OUTPUT_NAME]),
            helper.make_node("Sub", ["means", "grey"], ["offset"]),
            helper.make_node("Abs", ["offset"], ["distance"]),
            helper.make_node("ReduceMean", ["distance"], [OOD_OUTPUT], axes=[1], keepdims=0),
        ],
        "colours",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 8, 8, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
            helper.make_tensor("grey", TensorProto.FLOAT, [], [128.0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def colour_image(rng, kind: int, dark: bool = False) -> np.ndarray:
    pixels = rng.integers(60, 120, (8, 8, 3)).astype(np.uint8)
    pixels[..., kind] = rng.integers(120, 200, (8, 8))
    return pixels // 4 if dark else pixels


def test_a_folder_is_tested_with_the_models_own_outputs(tmp_path):
    from service.core.classifier import load_classifier, model_in_folder
    from service.core.postprocessing import calibrated_predictions

    model_contract = contract(ood_threshold=100.0)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    proto = colour_model()
    model_contract.write_to_onnx(proto)
    onnx.save(proto, artifact / "model.onnx")
    artifacts.write_json(artifact / "metadata.json", model_contract.to_metadata())
    # The reference: the model's own calibrated outputs on held-out images, as training does.
    rng = np.random.default_rng(4)
    kinds = rng.choice(3, 600)
    classifier = load_classifier(model_in_folder(artifact, "the test model"))
    outputs = classifier.predict(np.stack([colour_image(rng, kind) for kind in kinds]))
    answered = calibrated_predictions(outputs.logits, outputs.ood_scores, model_contract)
    build_reference(answered.probabilities, kinds, answered.ood_scores, kinds).save(
        artifact / REFERENCE_FILE
    )
    # 100 images like the reference, then 100 dark red ones (unlabelled), and a broken file.
    images = tmp_path / "images"
    images.mkdir()
    for number, kind in enumerate(rng.choice(3, 100)):
        (images / f"a{number:03}.png").write_bytes(encode_image(colour_image(rng, kind), "PNG"))
    for number in range(100):
        dark = colour_image(rng, 0, dark=True)
        (images / f"b{number:03}.png").write_bytes(encode_image(dark, "PNG"))
    (images / "c-broken.png").write_bytes(b"not an image")

    output = tmp_path / "report"
    figures = run_drift(DriftConfig(artifact=artifact, folder=images, window=50, output=output))
    assert figures["source"]["images"] == 200 and figures["source"]["skipped"] == 1
    assert set(figures["tests"]) == {"bbsd", "knn", "label"} and figures["absent"] == {}
    assert [window["drift"] for window in figures["windows"]] == [False, False, True, True]
    assert [window["from"] for window in figures["windows"]][::2] == ["a000.png", "b000.png"]
    assert figures["overall"]["moved_classes"][0]["label"] == "cat"
    assert figures["overall"]["labelled"] == 0
    assert (output / "drift_score.png").read_bytes().startswith(PNG)

    # Images in class sub-folders are labelled with their class.
    labelled = tmp_path / "labelled"
    for number, kind in enumerate(rng.choice(3, 60)):
        path = labelled / LABELS[kind] / f"{number:03}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(colour_image(rng, kind), "PNG"))
    config = DriftConfig(artifact=artifact, folder=labelled, window=20, output=output)
    figures = run_drift(config)
    assert figures["overall"]["labelled"] == 60 and figures["overall"]["accuracy"] == 1.0
    text = format_drift(figures)
    assert "60 labelled by their class sub-folder" in text and "sorted order" in text
