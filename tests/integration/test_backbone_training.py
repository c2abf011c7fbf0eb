"""A backbone end to end, without the internet: the issue's own command (MobileNetV3-Small,
--weights none, one epoch) on a folder of small generated colour images trains both phases,
exports behind the parity gate, publishes, and serves through ``make serve``; ImageNet weights
with no network fail fast in one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.helpers import ROOT, encode_image, free_port, run_training_cli, shape_image
from training.cli import ExitCode

pytestmark = pytest.mark.slow
CLASSES = {"square": 0, "hbar": 1, "vbar": 2}


def write_colour_folder(root, per_class: int = 16):
    rng = np.random.default_rng(7)
    for name, kind in CLASSES.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = shape_image(kind, 48, colour=True, rng=rng)
            (root / name / f"{index:02d}.jpg").write_bytes(encode_image(pixels, "JPEG", quality=95))
    return root


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("backbone")
    data = write_colour_folder(scratch / "photos")
    output = scratch / "artifacts"
    result = run_training_cli(
        "--data", str(data), "--backbone", "mobilenet_v3_small", "--weights", "none",
        "--epochs", "1", "--output", str(output), "--name", "photos",
        "--audit", "off",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"folder": (output / "photos" / "latest").resolve(), "result": result, "data": data}


def test_both_phases_run_and_are_recorded(photo_run):
    folder, stdout = photo_run["folder"], photo_run["result"].stdout
    assert "phase 1 (head, backbone frozen): features of" in stdout
    assert "phase 2 (fine-tuning): the top 30 layers of mobilenet_v3_small" in stdout
    history = json.loads((folder / "history.json").read_text())
    assert history["phase"] == ["head", "fine_tune"]
    assert len(history["loss"]) == len(history["val_loss"]) == 2
    metadata = json.loads((folder / "metadata.json").read_text())
    phases = metadata["training"]["phases"]
    assert phases["head"]["feature_seconds"] > 0 and phases["head"]["epochs"] == 1
    assert phases["fine_tune"]["first_epoch"] == 2
    assert phases["fine_tune"]["train_images_per_second"] > 0
    assert metadata["config"]["backbone"] == "mobilenet_v3_small"
    assert metadata["config"]["weights"] == "none"
    report = json.loads((folder / "report.json").read_text())
    assert set(report["training_phases"]) == {"head", "fine_tune"}
    for plot in ("loss.png", "accuracy.png"):
        assert (folder / "plots" / plot).stat().st_size > 0


def test_the_model_takes_raw_224_pixels_and_passed_the_gate(photo_run):
    import onnx

    from service.core.contract import ModelContract

    folder = photo_run["folder"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["export"]["parity"]["passed"]
    contract = ModelContract.read_from_onnx(onnx.load(str(folder / "model.onnx")))
    assert contract.image.shape == (224, 224, 3)  # the backbone's size; colour data stays colour
    assert contract.labels == tuple(sorted(CLASSES))
    assert contract.has_detector


def wait_ready(process: subprocess.Popen, url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"make serve was not ready in {seconds} s")


def test_make_serve_serves_the_backbone_model_over_http(photo_run):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        ["make", "serve", "NAME=photos", f"PORT={port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "WORKERS": "1"},
    )
    try:
        wait_ready(process, url)
        model = httpx.get(f"{url}/model").json()
        assert model["name"] == "photos" and model["image"]["height"] == 224
        # BATCHING=auto measured this model at start-up and chose by the documented rule.
        batching = model["batching"]
        assert batching["setting"] == "auto" and batching["measured"]["batch_1_ms"] > 0
        photo = encode_image(shape_image(1, 160, colour=True, rng=np.random.default_rng(1)), "PNG")
        answer = httpx.post(f"{url}/classify", files={"image": ("bar.png", photo)}).json()
        assert answer["label"] in {*CLASSES, "unknown"}
        assert {entry["label"] for entry in answer["top_k"]} == set(CLASSES)
        assert isinstance(answer["unknown"], bool) and answer["ood_score"] >= 0
        oip = httpx.post(
            f"{url}/v2/models/photos/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 224, 224, 3],
                        "datatype": "UINT8",
                        "data": [128] * (224 * 224 * 3),
                    }
                ]
            },
        )
        assert oip.status_code == 200, oip.text
        outputs = {output["name"]: output for output in oip.json()["outputs"]}
        assert outputs["probabilities"]["shape"] == [1, 3]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_the_offline_cli_classifies_with_the_backbone_model(photo_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.predict", str(photo_run["data"]), "--model",
         str(photo_run["folder"]), "--format", "csv", "--output", str(tmp_path / "out.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 16


def test_imagenet_weights_without_internet_stop_in_seconds_in_one_line(tmp_path):
    started = time.monotonic()
    result = run_training_cli(
        "--data", str(write_colour_folder(tmp_path / "photos", 4)),
        "--backbone", "efficientnet_b0", "--weights", "imagenet", "--output", str(tmp_path / "a"),
        # No network: every download goes to a closed local port, and Keras's cache is empty.
        env={"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
             "NO_PROXY": "", "KERAS_HOME": str(tmp_path / "keras")},
        timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == ExitCode.WEIGHTS
    assert elapsed < 30, elapsed
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--weights PATH" in errors[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("model.onnx"))
