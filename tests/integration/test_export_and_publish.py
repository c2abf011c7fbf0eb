"""Export to ONNX behind the parity gate, and publishing to the BentoML model store."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from service.core.contract import INPUT_NAME, OUTPUT_NAME, ModelContract
from service.core.postprocessing import softmax
from tests.helpers import run_training_cli
from training.cli import ExitCode

pytestmark = [pytest.mark.slow]


def test_onnx_model_carries_its_metadata_and_passes_the_checker(tiny_run):
    folder = tiny_run["folder"]
    proto = onnx.load(folder / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert (
        max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    )
    contract = ModelContract.read_from_onnx(proto)
    metadata = json.loads((folder / "metadata.json").read_text())
    # The model file carries the whole contract, equal to what metadata.json records.
    assert contract == ModelContract.from_metadata(metadata)
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    assert list(contract.labels) == labels
    assert contract.name == "tiny" and contract.version == folder.name
    assert len(contract.data_fingerprint) == 64 and 0 <= contract.metrics["test_accuracy"] <= 1
    assert contract.opset == 17
    (image,) = proto.graph.input
    outputs = {output.name: output for output in proto.graph.output}
    assert list(outputs) == [contract.output_name, contract.ood_output_name, "cam"]
    assert (image.name, contract.output_name) == (INPUT_NAME, OUTPUT_NAME)
    dims = [dim.dim_param or dim.dim_value for dim in image.type.tensor_type.shape.dim]
    assert dims == ["batch", 28, 28, 1]

    def shape(name):
        return [d.dim_param or d.dim_value for d in outputs[name].type.tensor_type.shape.dim]

    assert shape(OUTPUT_NAME) == ["batch", 10] and shape("ood_score") == ["batch"]
    assert shape("cam") == ["batch", 7, 7] and contract.cam_shape == (7, 7)


def test_metadata_records_the_parity_gate_and_latency_ratio(tiny_run):
    export = json.loads((tiny_run["folder"] / "metadata.json").read_text())["export"]
    parity = export["parity"]
    assert parity["passed"] and parity["images"] >= 256
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    for batch in ("batch_1", "batch_32"):
        assert export["latency"][batch]["keras_over_onnxruntime"] > 0
    assert "parity gate: 256 images" in tiny_run["result"].stdout


def test_onnxruntime_agrees_with_keras_on_held_out_images(tiny_run):
    import keras

    folder = tiny_run["folder"]
    model = keras.saving.load_model(folder / "model.keras")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    from training.data.sources import load_animals

    pixels = load_animals().pixels[:64, ..., np.newaxis].astype(np.float32)
    keras_p = softmax(np.asarray(model(pixels, training=False)))
    onnx_p = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])
    assert np.abs(keras_p - onnx_p).max() <= 1e-4
    assert (keras_p.argmax(1) == onnx_p.argmax(1)).all()


def test_altered_onnx_weights_are_refused_and_nothing_is_written(tiny_run, tmp_path):
    import bentoml
    import keras

    from training.config import TrainConfig
    from training.data.prepare import prepare_data
    from training.export.convert import ExportError, convert_to_onnx
    from training.export.write import write_checked

    folder = tmp_path / "copy"
    shutil.copytree(tiny_run["folder"], folder, ignore=shutil.ignore_patterns("model.onnx"))
    metadata = json.loads((folder / "metadata.json").read_text())
    model = keras.saving.load_model(folder / "model.keras")
    data = prepare_data(TrainConfig.from_dict(metadata["config"]))
    proto = convert_to_onnx(model, ModelContract.from_metadata(metadata))
    # Tamper with the classifier head: the kind of silent corruption the gate exists for.
    head = max(
        proto.graph.initializer,
        key=lambda tensor: np.prod(tensor.dims) if len(tensor.dims) == 2 else 0,
    )
    weights = numpy_helper.to_array(head).copy()
    weights += np.random.default_rng(0).normal(0, 0.5, weights.shape).astype(weights.dtype)
    head.CopyFrom(numpy_helper.from_array(weights, head.name))
    models_before = [str(model.tag) for model in bentoml.models.list()]
    with pytest.raises(ExportError, match="disagrees with Keras"):
        write_checked(folder, proto, model, data)
    assert not (folder / "model.onnx").exists()
    assert json.loads((folder / "metadata.json").read_text()) == metadata
    assert [str(model.tag) for model in bentoml.models.list()] == models_before


def test_a_broken_unknown_input_score_is_refused_and_nothing_is_written(tiny_run, tmp_path):
    import keras

    from training.config import TrainConfig
    from training.data.prepare import prepare_data
    from training.export.convert import ExportError, convert_to_onnx
    from training.export.quantize import detector_only_nodes
    from training.export.write import write_checked
    from training.quality.detector import DETECTOR_FILE, UnknownInputDetector

    folder = tmp_path / "copy"
    shutil.copytree(tiny_run["folder"], folder, ignore=shutil.ignore_patterns("model.onnx"))
    metadata = json.loads((folder / "metadata.json").read_text())
    model = keras.saving.load_model(folder / "model.keras")
    data = prepare_data(TrainConfig.from_dict(metadata["config"]))
    contract = ModelContract.from_metadata(metadata)
    detector = UnknownInputDetector.load(folder / DETECTOR_FILE)
    assert detector.bank is not None  # the score has its nearest-neighbour part
    proto = convert_to_onnx(model, contract, detector)
    # The untouched graph passes, score included.
    report = write_checked(folder, proto, model, data, detector=detector)
    assert report["parity"]["ood_max_abs_diff_over_threshold"] <= 1e-3
    (folder / "model.onnx").unlink()
    # Tamper with a constant that only the score reads (the logits stay exact).
    score_nodes = set(detector_only_nodes(proto, contract))
    score_inputs = {
        name for node in proto.graph.node if node.name in score_nodes for name in node.input
    }
    constants = [tensor for tensor in proto.graph.initializer if tensor.name in score_inputs]
    target = max(constants, key=lambda tensor: np.prod(tensor.dims))
    values = numpy_helper.to_array(target).copy()
    values *= 1.01
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    with pytest.raises(ExportError, match="score off by"):
        write_checked(folder, proto, model, data, detector=detector)
    assert not (folder / "model.onnx").exists()


def test_published_model_loads_back_by_tag_and_by_latest(tiny_run):
    import bentoml

    metadata = json.loads((tiny_run["folder"] / "metadata.json").read_text())
    tag = f"tiny:{metadata['version']}"
    assert f"published to the BentoML model store as {tag}" in tiny_run["result"].stdout
    by_tag, latest = bentoml.models.get(tag), bentoml.models.get("tiny:latest")
    assert str(by_tag.tag) == str(latest.tag) == tag
    contract = ModelContract.from_metadata(metadata)
    stored = contract.to_store_metadata()
    assert {key: by_tag.info.metadata[key] for key in stored} == stored
    published = json.loads(Path(by_tag.path_of("metadata.json")).read_text())
    assert ModelContract.from_metadata(published) == contract
    session = ort.InferenceSession(latest.path_of("model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((3, 28, 28, 1), np.float32)})[0]
    assert out.shape == (3, 10)
    for name in ("labels.json", "metadata.json"):
        assert json.loads(Path(by_tag.path_of(name)).read_text())


def test_reexport_cli_is_idempotent_and_refuses_a_missing_artifact(tiny_run, tmp_path):
    folder = tiny_run["folder"]
    result = run_training_cli("export", "--artifact", str(folder))
    assert result.returncode == 0, result.stderr
    assert "parity gate" in result.stdout and "published" in result.stdout
    missing = run_training_cli("export", "--artifact", str(tmp_path / "nothing"))
    assert missing.returncode == ExitCode.MODEL and "not an artifact folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_int8_quantization_keeps_the_contract_and_is_gated(tiny_run):
    from training.data.sources import load_animals
    from training.export.quantize import QuantizationError, check_int8, quantize_int8

    proto = onnx.load(tiny_run["folder"] / "model.onnx")
    contract = ModelContract.read_from_onnx(proto)
    animals = load_animals()
    pixels = animals.pixels[:, ..., np.newaxis].astype(np.float32)
    quantized = quantize_int8(proto, pixels[:64])
    # The same contract, marked int8, and the same interface: float32 raw pixels in, logits out.
    assert ModelContract.read_from_onnx(quantized) == dataclasses.replace(
        contract, precision="int8"
    )
    operators = {node.op_type for node in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    (image,) = quantized.graph.input
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == [
        "batch",
        28,
        28,
        1,
    ]
    inputs = pixels[-400:]
    labels = np.asarray([contract.labels.index(name) for name in animals.names[-400:]])
    report = check_int8(proto, quantized, inputs, labels, max_loss_points=100)
    float_top, int8_top = (
        ort.InferenceSession(model.SerializeToString()).run(None, {INPUT_NAME: inputs})[0].argmax(1)
        for model in (proto, quantized)
    )
    agreement = np.mean(float_top == int8_top)
    assert report["top1_agreement"] == pytest.approx(agreement, abs=1e-4)
    assert agreement >= 0.9, report  # a broken quantization (e.g. saturating) falls far below
    assert report["batch_1_us_float32"] > 0 and report["batch_1_us_int8"] > 0
    with pytest.raises(QuantizationError, match="without --quantize int8"):
        check_int8(proto, quantized, inputs, labels, max_loss_points=-100)
