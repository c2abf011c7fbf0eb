"""A model that cannot be served stops `bentoml serve` at once with one clear line, and the
server never reports ready."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.core.contract import INPUT_NAME, OUTPUT_NAME, ModelContract
from tests.helpers import ROOT, free_port

pytestmark = [pytest.mark.slow]


def serve(**env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            "service.service:ImageClassifier",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def copy_model(tiny_run, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_run["folder"], folder)
    return folder


def with_contract(proto, **changes):
    """``proto`` with its contract changed as given (e.g. other labels)."""
    contract = ModelContract.read_from_onnx(proto)
    dataclasses.replace(contract, **changes).write_to_onnx(proto)
    return proto


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    error_lines = [line for line in output.splitlines() if line.startswith("error: cannot serve")]
    assert len(error_lines) == 1, output[-2000:]
    for word in words:
        assert word in error_lines[0], error_lines[0]
    assert "Traceback" not in output
    assert "Starting production" not in output  # never listened, so never ready


def test_missing_model_folder(tmp_path):
    assert_refused(serve(MODEL_PATH=str(tmp_path / "nothing")), "not a folder")


def test_missing_model_in_the_store():
    assert_refused(
        serve(MODEL_PATH="", MODEL_TAG="nosuchmodel:latest"),
        "nosuchmodel:latest",
        "not in the BentoML model store",
    )


def test_corrupt_onnx_file(tiny_run, tmp_path):
    folder = copy_model(tiny_run, tmp_path)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf" * 100)
    assert_refused(serve(MODEL_PATH=str(folder)), "not a loadable ONNX model")


def test_labels_that_do_not_match_the_output(tiny_run, tmp_path):
    folder = copy_model(tiny_run, tmp_path)
    proto = onnx.load(folder / "model.onnx")
    onnx.save(with_contract(proto, labels=("cat", "dog", "other")), folder / "model.onnx")
    assert_refused(serve(MODEL_PATH=str(folder)), "outputs 10 scores", "3 labels")


def test_an_input_that_is_not_an_image_tensor(tiny_run, tmp_path):
    folder = copy_model(tiny_run, tmp_path)
    original = onnx.load(folder / "model.onnx")
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])],
        "not-an-image",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = original.ir_version
    ModelContract.read_from_onnx(original).write_to_onnx(model)
    onnx.save(model, folder / "model.onnx")
    assert_refused(serve(MODEL_PATH=str(folder)), "not an image tensor")
