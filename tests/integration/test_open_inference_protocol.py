"""The Open Inference Protocol under /v2, driven by the official ``tritonclient.http`` client."""

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.removeprefix("http://"))


@pytest.fixture(scope="module")
def images():
    from training.data.sources import load_animals

    return load_animals().pixels[:5, ..., np.newaxis]


def tensor(images, datatype="UINT8", binary=True, name="image"):
    entry = triton.InferInput(name, list(images.shape), datatype)
    dtype = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32}[datatype]
    entry.set_data_from_numpy(images.astype(dtype), binary_data=binary)
    return entry


def test_server_and_model_metadata(client, offline):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(offline.name)
    metadata = client.get_model_metadata(offline.name)
    assert metadata["name"] == offline.name and metadata["versions"] == [offline.version]
    assert metadata["inputs"][0]["name"] == "image"
    assert metadata["inputs"][0]["shape"] == [-1, 28, 28, 1]
    assert metadata["outputs"][0] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, offline.num_classes],
    }


@pytest.mark.parametrize(
    ("datatype", "binary"), [("UINT8", True), ("FP32", True), ("UINT8", False), ("FP32", False)]
)
def test_infer_equals_offline_onnxruntime(client, offline, images, datatype, binary):
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(offline.name, [tensor(images, datatype, binary)], outputs=[output])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, offline.num_classes)
    np.testing.assert_allclose(
        probabilities,
        offline.classify(images, 1).predictions.probabilities,
        rtol=1e-5,
        atol=1e-6,
    )


def test_infer_with_default_outputs_uses_binary_data(client, offline, images):
    result = client.infer(offline.name, [tensor(images)])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"),
        offline.classify(images, 1).predictions.probabilities,
        rtol=1e-5,
        atol=1e-6,
    )
    # The unknown-input score comes along by default, equal to onnxruntime's own.
    np.testing.assert_allclose(
        result.as_numpy("ood_score"), offline.predict(images).ood_scores, rtol=1e-5, atol=1e-5
    )


def test_classification_extension_returns_top_k_labels(client, offline, images):
    output = triton.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(offline.name, [tensor(images)], outputs=[output])
    labels = result.as_numpy("probabilities")
    assert labels.shape == (5, 3)
    expected = offline.classify(images, 3).to_dicts()
    for row, reference in zip(labels, expected, strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        assert [label for _, _, label in parsed] == [e["label"] for e in reference["top_k"]]
        assert [offline.labels[int(index)] for _, index, _ in parsed] == [
            e["label"] for e in reference["top_k"]
        ]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda x: tensor(x, name="pixels"), "unknown_input"),
        (lambda x: tensor(x[:, :27]), "invalid_shape"),
        (lambda x: tensor(x, datatype="INT32"), "invalid_datatype"),
    ],
)
def test_wrong_tensor_is_refused_with_a_4xx(client, offline, images, server, make, code):
    with pytest.raises(InferenceServerException) as caught:
        client.infer(offline.name, [make(images)])
    assert caught.value.status() == "400" and code in caught.value.message()
    # The refusal leaves the server answering as before.
    np.testing.assert_allclose(
        client.infer(offline.name, [tensor(images)]).as_numpy("probabilities"),
        offline.classify(images, 1).predictions.probabilities,
        rtol=1e-5,
        atol=1e-6,
    )


def test_unknown_model_and_raw_json_errors(server, offline):
    response = httpx.post(f"{server}/v2/models/unknown/infer", json={"inputs": []})
    assert response.status_code == 404 and response.json()["error"] == "model_not_found"
    response = httpx.post(f"{server}/v2/models/{offline.name}/infer", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"] == "invalid_json"
    nan = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 28, 28, 1],
                "data": [float("nan")] * 784,
            }
        ]
    }
    response = httpx.post(f"{server}/v2/models/{offline.name}/infer", content=json.dumps(nan))
    assert response.status_code == 400 and response.json()["error"] == "invalid_data"


def test_an_unknown_input_gets_the_score_and_unknown_in_the_classification(
    client, offline, outlier_image
):
    image = offline.preprocess(outlier_image)[np.newaxis]
    metadata = client.get_model_metadata(offline.name)
    assert metadata["outputs"][1] == {"name": "ood_score", "datatype": "FP32", "shape": [-1]}
    assert float(metadata["parameters"]["ood_threshold"]) == offline.contract.ood_threshold
    outputs = [
        triton.InferRequestedOutput("probabilities", class_count=2),
        triton.InferRequestedOutput("ood_score"),
    ]
    result = client.infer(offline.name, [tensor(image)], outputs=outputs)
    (row,) = result.as_numpy("probabilities")
    closest = offline.classify(image, 1).ranked[0][0]
    first, second = (entry.decode().split(":") for entry in row)
    assert first[1:] == ["-1", "unknown"]
    assert second[1:] == [str(offline.labels.index(closest["label"])), closest["label"]]
    (score,) = result.as_numpy("ood_score")
    assert score > offline.contract.ood_threshold
