"""Class activation maps, end to end: the ``cam`` output behind the parity gate (which a broken
map fails), over HTTP (explain=1 and png, the answers without explain unchanged), through the
Open Inference Protocol with ``tritonclient``, in the CLI, and the deletion test of its
faithfulness on a model trained here."""

import base64
import io
import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, encode_image, run_training_cli

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def pngs():
    from training.data.sources import load_animals

    pixels = load_animals().pixels
    return [encode_image(pixels[index], "PNG") for index in range(0, 4000, 500)]


def offline_maps(offline, data: list[bytes]) -> np.ndarray:
    return offline.predict(np.stack([offline.preprocess(item) for item in data])).cams


# --- the export and its gate -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of the tiny artifact without its model.onnx, its Keras model, data and contract."""
    import keras

    from service.core.contract import ModelContract
    from training.config import TrainConfig
    from training.data.prepare import prepare_data

    folder = tmp_path_factory.mktemp("gate") / "copy"
    shutil.copytree(tiny_run["folder"], folder, ignore=shutil.ignore_patterns("model.onnx"))
    metadata = json.loads((folder / "metadata.json").read_text())
    return {
        "folder": folder,
        "model": keras.saving.load_model(folder / "model.keras"),
        "data": prepare_data(TrainConfig.from_dict(metadata["config"])),
        "contract": ModelContract.from_metadata(metadata),
    }


def test_the_real_export_has_the_map_and_passes_the_gate(tiny_run):
    import onnx

    from service.core.contract import ModelContract

    folder = tiny_run["folder"]
    contract = ModelContract.read_from_onnx(onnx.load(folder / "model.onnx"))
    assert contract.has_cam and contract.cam_shape == (7, 7)  # the last block, under its pooling
    parity = json.loads((folder / "metadata.json").read_text())["export"]["parity"]
    assert parity["cam_passed"] and parity["cam_max_abs_diff"] <= 1e-3
    assert parity["cam_shape"] == [7, 7] and parity["cam_peak_agreement"] > 0.99
    assert "parity gate, class activation map" in tiny_run["result"].stdout


def broken_map(kind: str):
    """The export's map function, broken: computed for the least likely class, or from the
    feature map with its positions shuffled."""
    import tensorflow as tf

    from training.model import cam

    original = cam.class_activation_map

    def wrong_class(feature_map, logits, kernel):
        return original(feature_map, -logits, kernel)  # argmax of -logits: the last class

    def shuffled(feature_map, logits, kernel):
        _, height, width, depth = feature_map.shape
        order = np.random.default_rng(0).permutation(height * width)
        flat = tf.gather(tf.reshape(feature_map, (-1, height * width, depth)), order, axis=1)
        return original(tf.reshape(flat, (-1, height, width, depth)), logits, kernel)

    return {"wrong class": wrong_class, "shuffled feature map": shuffled}[kind]


@pytest.mark.parametrize("kind", ["wrong class", "shuffled feature map"])
def test_a_broken_map_fails_the_gate_and_nothing_is_written(exported, monkeypatch, kind):
    from training.export.convert import ExportError, convert_to_onnx
    from training.export.write import write_checked
    from training.model import cam

    monkeypatch.setattr(cam, "class_activation_map", broken_map(kind))
    proto = convert_to_onnx(exported["model"], exported["contract"])
    monkeypatch.undo()
    with pytest.raises(ExportError, match="class activation map off Grad-CAM by") as raised:
        write_checked(exported["folder"], proto, exported["model"], exported["data"])
    # The logits are right: only the map gave the broken export away.
    assert "argmax agreement 100.00%" in str(raised.value)
    assert not (exported["folder"] / "model.onnx").exists()


def test_a_head_that_is_not_pooling_and_linear_gets_no_map_and_the_contract_says_so():
    import keras

    from service.core.contract import ModelContract
    from service.core.preprocessing import ImageSpec
    from training.export.convert import convert_to_onnx
    from training.model import cam

    inputs = keras.Input((12, 12, 1), name="image")
    features = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(features))
    model = keras.Model(inputs, logits)
    fields = cam.contract_fields(model)
    assert fields == {"cam_output_name": "", "cam_shape": (), "cam_left_out": cam.LEFT_OUT}
    contract = ModelContract(
        name="flat", version="1", labels=("a", "b", "c"), image=ImageSpec(12, 12, 1), opset=17,
        **fields,
    )  # fmt: skip
    proto = convert_to_onnx(model, contract)
    assert [output.name for output in proto.graph.output] == ["logits"]
    assert ModelContract.read_from_onnx(proto).to_metadata()["explanation"]["left_out"] == (
        cam.LEFT_OUT
    )


# --- over HTTP ---------------------------------------------------------------------------------


def classify(server, data: bytes, explain: str | None = None, path: str = "/classify"):
    params = {} if explain is None else {"explain": explain}
    return httpx.post(f"{server}{path}", params=params, files={"image": ("a.png", data)})


def test_explain_1_adds_the_map_of_the_stated_shape_in_0_1(server, offline, pngs):
    shape = httpx.get(f"{server}/model").json()["cam"]["shape"]
    assert shape == list(offline.contract.cam_shape)
    expected = offline_maps(offline, pngs)
    for data, reference in zip(pngs, expected, strict=True):
        response = classify(server, data, "1")
        assert response.status_code == 200, response.text
        cam = np.asarray(response.json()["cam"])
        assert list(cam.shape) == shape and cam.min() >= 0 and cam.max() <= 1
        assert cam.max() == 1.0 or cam.max() == 0.0  # scaled to its peak
        np.testing.assert_allclose(cam, reference, atol=1e-3)  # what onnxruntime gives offline


def test_explain_png_adds_an_overlay_of_the_inputs_size(server):
    rng = np.random.default_rng(0)
    photo = encode_image(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), "JPEG")
    response = classify(server, photo, "png")
    assert response.status_code == 200, response.text
    answer = response.json()
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (96, 64) and overlay.mode == "RGB"
    overlay.load()
    assert np.asarray(answer["cam"]).shape == (7, 7)


def test_without_explain_the_answer_is_as_before(server, offline, pngs):
    keys = {"label", "score", "top_k", "unknown", "ood_score", "ood_threshold", "model"}
    for data in pngs[:3]:
        plain = classify(server, data).json()
        off = classify(server, data, "0").json()
        explained = classify(server, data, "1").json()
        assert set(plain) == keys | {"request_id"} and set(off) == set(plain)
        for answer in (off, explained):
            same = {key: answer[key] for key in keys}
            assert same == {key: plain[key] for key in keys}


def test_the_batch_endpoint_explains_each_image_in_order(server, offline, pngs):
    files = [("images", (f"{index}.png", data)) for index, data in enumerate(pngs)]
    response = httpx.post(f"{server}/classify_batch", params={"explain": "png"}, files=files)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    for answer, reference in zip(answers, offline_maps(offline, pngs), strict=True):
        np.testing.assert_allclose(answer["cam"], reference, atol=1e-3)
        assert Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))).size == (28, 28)


@pytest.mark.parametrize("value", ["2", "yes", "jpeg"])
def test_an_unknown_explain_value_gets_a_json_400(server, pngs, value):
    response = classify(server, pngs[0], value)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_field"
    assert "explain must be 0, 1" in response.json()["detail"]


# --- the Open Inference Protocol ---------------------------------------------------------------


def test_oip_returns_cam_when_asked_for_it_by_name(server, offline):
    import tritonclient.http as triton

    from training.data.sources import load_animals

    images = load_animals().pixels[:5, ..., np.newaxis]
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    outputs = client.get_model_metadata(offline.name)["outputs"]
    assert {"name": "cam", "datatype": "FP32", "shape": [-1, 7, 7]} in outputs
    expected = offline.predict(images).cams
    for binary in (True, False):
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        asked = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("cam",)]
        result = client.infer(offline.name, [tensor], outputs=asked)
        maps = result.as_numpy("cam")
        assert maps.dtype == np.float32 and maps.shape == (5, 7, 7)
        np.testing.assert_allclose(maps, expected, atol=1e-6)
        assert result.as_numpy("probabilities") is None
    # Not asked for by name: not sent.
    default = client.infer(offline.name, [tensor])
    assert default.as_numpy("cam") is None and default.as_numpy("probabilities") is not None


# --- the CLI -----------------------------------------------------------------------------------


def test_the_cli_writes_an_overlay_per_image(tiny_run, tmp_path):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    (folder / "wide.jpg").write_bytes(
        encode_image(rng.integers(0, 255, (40, 120, 3), dtype=np.uint8), "JPEG")
    )
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "overlays"
    result = subprocess.run(
        [sys.executable, "-m", "service.predict", str(tmp_path / "photos"), "--model",
         str(tiny_run["folder"]), "--explain", str(out), "--format", "csv"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the broken file is counted as failed
    with Image.open(out / "nested" / "wide.jpg.png") as overlay:
        assert overlay.format == "PNG" and overlay.size == (120, 40)
    assert sorted(path.name for path in out.rglob("*") if path.is_file()) == ["wide.jpg.png"]
    assert "Traceback" not in result.stderr


# --- faithfulness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CNN trained well enough to be explained: 200 images per class, 6 epochs."""
    output = tmp_path_factory.mktemp("faithful")
    result = run_training_cli(
        "--max-per-class", "200", "--epochs", "6", "--output", str(output), "--name", "faithful",
        "--no-publish", "--audit", "off",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return (output / "faithful" / "latest").resolve()


def test_the_map_passes_the_deletion_test_and_broken_maps_fail_it(trained, tmp_path):
    figures_file = tmp_path / "faithfulness.json"
    result = run_training_cli(
        "faithfulness", "--artifact", str(trained), "--output", str(figures_file)
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(figures_file.read_text())
    results = figures["results"]
    assert figures["images"] == figures["test_images_in_split"] == 400
    assert results["map"]["passed"] and results["map"]["share_beating_random"] >= 0.8
    assert results["map"]["deletion_auc"] < results["random"]["deletion_auc"]
    for broken in ("shuffled map", "wrong-class map"):
        assert not results[broken]["passed"], results[broken]
        assert results[broken]["deletion_auc"] > results["map"]["deletion_auc"]
    assert "| map |" in result.stdout and "passes" in result.stdout
