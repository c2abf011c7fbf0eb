"""The model contract: written to and read back from an ONNX model, metadata.json and
labels.json unchanged, and a model without one refused with a line naming the fix."""

import dataclasses

import onnx
import pytest
from onnx import TensorProto, helper

from service.core.contract import INPUT_NAME, OUTPUT_NAME, ContractError, ModelContract
from service.core.preprocessing import ImageSpec

CONTRACT = ModelContract(
    name="animals",
    version="20261125-010203",
    labels=("cat", "dog", "other"),
    image=ImageSpec(28, 28, 1, "bicubic"),
    opset=17,
    metrics={"test_accuracy": 0.98, "balanced_accuracy": 0.97, "best_val_loss": None},
    data_source="built-in",
    data_fingerprint="ab" * 32,
)


def identity_model():
    graph = helper.make_graph(
        [helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])],
        "identity",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_onnx_model_carries_the_whole_contract_through_a_file(tmp_path):
    proto = identity_model()
    CONTRACT.write_to_onnx(proto)
    onnx.save(proto, tmp_path / "model.onnx")
    assert ModelContract.read_from_onnx(onnx.load(tmp_path / "model.onnx")) == CONTRACT


def test_onnxruntime_reads_the_same_contract():
    import onnxruntime as ort

    proto = identity_model()
    CONTRACT.write_to_onnx(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert ModelContract.read_from_session(session) == CONTRACT


def test_writing_twice_replaces_rather_than_appends():
    proto = identity_model()
    CONTRACT.write_to_onnx(proto)
    relabelled = dataclasses.replace(CONTRACT, labels=("x", "y", "z"))
    relabelled.write_to_onnx(proto)
    assert ModelContract.read_from_onnx(proto) == relabelled
    assert len(proto.metadata_props) == len(CONTRACT.to_onnx_props())


def test_metadata_json_and_labels_json_round_trip():
    assert ModelContract.from_metadata(CONTRACT.to_metadata()) == CONTRACT
    # labels.json, the class-label file: index = output position.
    assert CONTRACT.to_labels_file() == {"labels": ["cat", "dog", "other"]}
    assert CONTRACT.tag == "animals:20261125-010203" and CONTRACT.num_classes == 3


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({}, "has no labels, image in its metadata: export it with 'python -m training export'"),
        ({"labels": "[]"}, "has no image"),
        ({"labels": "not json", "image": "{}"}, "metadata is malformed"),
        ({"labels": '{"a": 1}', "image": CONTRACT.to_onnx_props()["image"]}, "not a list"),
    ],
)
def test_a_missing_or_malformed_contract_is_refused_in_one_line(props, message):
    with pytest.raises(ContractError, match=message) as raised:
        ModelContract.from_onnx_props(props, "model.onnx")
    assert "\n" not in str(raised.value)


def test_the_class_activation_map_or_why_it_was_left_out_travels_with_the_contract():
    mapped = dataclasses.replace(CONTRACT, cam_output_name="cam", cam_shape=(7, 7))
    left_out = dataclasses.replace(CONTRACT, cam_left_out="the head is not pooling + linear")
    for contract in (mapped, left_out):
        proto = identity_model()
        contract.write_to_onnx(proto)
        assert ModelContract.read_from_onnx(proto) == contract
        assert ModelContract.from_metadata(contract.to_metadata()) == contract
    assert mapped.has_cam and mapped.cam_shape == (7, 7)
    assert mapped.summary_for_clients()["cam"] == {"output": "cam", "shape": [7, 7]}
    assert mapped.to_store_metadata()["cam_shape"] == [7, 7]
    assert not left_out.has_cam
    explanation = left_out.to_metadata()["explanation"]
    assert explanation["output"] is None and "pooling" in explanation["left_out"]
    # A model exported before the map existed reads as one without it.
    props = CONTRACT.to_onnx_props()
    for key in ("cam_output_name", "cam_shape", "cam_left_out"):
        del props[key]
    assert not ModelContract.from_onnx_props(props).has_cam


def test_a_malformed_map_shape_is_refused_in_one_line():
    props = dataclasses.replace(CONTRACT, cam_output_name="cam", cam_shape=(7, 7)).to_onnx_props()
    with pytest.raises(ContractError, match="metadata is malformed"):
        ModelContract.from_onnx_props(props | {"cam_shape": "[7, "}, "model.onnx")
