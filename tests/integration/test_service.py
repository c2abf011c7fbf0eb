"""The prediction service, through a real ``bentoml serve`` process and real HTTP."""

import csv
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service.core.postprocessing import softmax
from tests.helpers import encode_image, run_training_cli

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def test_pngs():
    from training.data.sources import load_animals

    pixels = load_animals().pixels
    return [encode_image(pixels[index], "PNG") for index in range(0, 6400, 100)]


def classify(server, data: bytes, name="image.png", **form):
    return httpx.post(f"{server}/classify", files={"image": (name, data)}, data=form, timeout=30)


def expected(offline, data: bytes, k: int = 3) -> dict:
    return offline.classify(offline.preprocess(data)[np.newaxis], k).to_dicts()[0]


def assert_same_prediction(answer: dict, reference: dict) -> None:
    assert answer["label"] == reference["label"]
    assert [entry["label"] for entry in answer["top_k"]] == [
        entry["label"] for entry in reference["top_k"]
    ]
    np.testing.assert_allclose(
        [entry["score"] for entry in answer["top_k"]],
        [entry["score"] for entry in reference["top_k"]],
        rtol=1e-5,
        atol=1e-6,
    )


def test_classify_answers_what_onnxruntime_answers_offline(server, offline, test_pngs):
    for data in test_pngs[:8]:
        response = classify(server, data)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_same_prediction(answer, expected(offline, data))
        assert answer["model"] == {"name": offline.name, "version": offline.version}


def test_held_out_samples_get_the_label_the_evaluation_gave(server, tiny_run, tmp_path):
    result = run_training_cli(
        "samples", "--artifact", str(tiny_run["folder"]), "--output", str(tmp_path), "--count", "12"
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "labels.csv").open()))
    assert len(rows) == 12 and len({row["true_label"] for row in rows}) > 3
    for row in rows:
        answer = classify(server, (tmp_path / row["file"]).read_bytes(), name=row["file"]).json()
        # The evaluation's label is the top class (an input flagged unknown still has one).
        assert answer["top_k"][0]["label"] == row["evaluated_label"], row
        assert answer["label"] == ("unknown" if answer["unknown"] else row["evaluated_label"])


def test_an_input_unlike_the_training_images_is_answered_unknown(
    server, offline, outlier_image, test_pngs
):
    answer = classify(server, outlier_image, name="outlier").json()
    reference = expected(offline, outlier_image)
    assert reference["unknown"] is True  # the fixture checked it offline
    assert answer["label"] == "unknown" and answer["unknown"] is True
    # The closest classes are still there, with their calibrated scores.
    assert_same_prediction(answer, reference)
    assert answer["score"] == answer["top_k"][0]["score"]
    assert answer["ood_score"] == pytest.approx(reference["ood_score"], rel=1e-4)
    assert answer["ood_score"] > answer["ood_threshold"] == offline.contract.ood_threshold
    # In a batch, the verdict is per image.
    familiar = next(data for data in test_pngs if not expected(offline, data)["unknown"])
    files = [("images", ("animal.png", familiar)), ("images", ("outlier", outlier_image))]
    batch = httpx.post(f"{server}/classify_batch", files=files, timeout=30).json()["predictions"]
    assert [item["label"] == "unknown" for item in batch] == [False, True]
    assert [item["unknown"] for item in batch] == [False, True]


def test_scores_are_calibrated_and_unknown_label_can_be_turned_off(offline, outlier_image):
    outputs = offline.predict(offline.preprocess(outlier_image)[np.newaxis])
    temperature = offline.contract.temperature
    assert temperature != 1.0  # fitted on the validation split
    np.testing.assert_allclose(
        offline.answer(outputs, 1).predictions.probabilities,
        softmax(outputs.logits / temperature),
        rtol=1e-6,
    )
    (raw,) = offline.answer(outputs, 3, unknown_label=False).to_dicts()
    (flagged,) = offline.answer(outputs, 3).to_dicts()
    assert raw["unknown"] is flagged["unknown"] is True
    assert raw["label"] == raw["top_k"][0]["label"] != flagged["label"] == "unknown"


def test_top_k_is_sorted_and_sums_to_at_most_one(server, test_pngs, offline):
    answer = classify(server, test_pngs[0], top_k="5").json()
    scores = [entry["score"] for entry in answer["top_k"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert sum(scores) <= 1 + 1e-6
    assert answer["score"] == scores[0]
    everything = classify(server, test_pngs[0], top_k=str(offline.num_classes)).json()
    assert sum(entry["score"] for entry in everything["top_k"]) == pytest.approx(1, abs=1e-5)
    assert len(classify(server, test_pngs[0]).json()["top_k"]) == 3


def test_a_batch_of_64_is_answered_in_order(server, offline, test_pngs):
    files = [("images", (f"{index}.png", data)) for index, data in enumerate(test_pngs)]
    response = httpx.post(f"{server}/classify_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 64
    for data, answer in zip(test_pngs, predictions, strict=True):
        assert_same_prediction(answer, expected(offline, data))


def test_a_large_colour_photo_is_converted_and_resized(server, offline):
    across = np.linspace(0, 255, 4000, dtype=np.uint8)[np.newaxis, :].repeat(3000, axis=0)
    down = np.linspace(0, 255, 3000, dtype=np.uint8)[:, np.newaxis].repeat(4000, axis=1)
    photo = encode_image(np.stack([across, down, 255 - across], axis=-1), "JPEG", quality=80)
    assert Image.open(io.BytesIO(photo)).size == (4000, 3000)
    response = classify(server, photo, name="photo.jpg")
    assert response.status_code == 200, response.text
    assert_same_prediction(response.json(), expected(offline, photo))


def _truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    data = encode_image(noise, "PNG")
    return data[: len(data) // 2]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, format="PNG")  # 48 Mpx in a few kilobytes
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        (lambda s: classify(s, b"%PDF-1.4 not an image"), 415, "not_an_image"),
        (lambda s: classify(s, _truncated_png()), 400, "corrupt_image"),
        (lambda s: classify(s, b""), 400, "empty_file"),
        (lambda s: classify(s, _bomb()), 413, "image_too_large"),
        (lambda s: classify(s, b"x" * (9 * 1024 * 1024)), 413, "body_too_large"),
        (
            lambda s: httpx.post(f"{s}/classify", files={"picture": ("a.png", b"x")}),
            400,
            "missing_field",
        ),
        (lambda s: httpx.post(f"{s}/classify", data={"top_k": "3"}), 400, "missing_field"),
        (lambda s: classify(s, b"x", top_k="0"), 400, "top_k_out_of_range"),
        (lambda s: classify(s, b"x", top_k="11"), 400, "top_k_out_of_range"),
        (lambda s: classify(s, b"x", top_k="many"), 400, "invalid_field"),
        (
            lambda s: httpx.post(f"{s}/classify_batch", files=[("images", ("a.png", b"x"))] * 65),
            400,
            "too_many_images",
        ),
        (lambda s: httpx.get(f"{s}/no/such/path"), 404, "not_found"),
    ],
    ids=[
        "not-image",
        "truncated",
        "zero-bytes",
        "pixel-bomb",
        "body-limit",
        "wrong-field",
        "no-file",
        "top-k-0",
        "top-k-11",
        "top-k-text",
        "65-images",
        "unknown-path",
    ],
)
def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(
    server, test_pngs, send, status, code
):
    response = send(server)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"]
    assert classify(server, test_pngs[0]).status_code == 200


def test_health_and_openapi(server):
    for path in ("/healthz", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{server}{path}").status_code == 200, path
    spec = httpx.get(f"{server}/docs.json").json()
    assert {"/classify", "/classify_batch", "/v2/models/{name}/infer"} <= set(spec["paths"])


def test_the_raw_image_as_the_body_gets_the_multipart_answer(server, test_pngs):
    multipart = classify(server, test_pngs[0], top_k="2").json()
    raw = httpx.post(
        f"{server}/classify?top_k=2", content=test_pngs[0], headers={"content-type": "image/png"}
    )
    assert raw.status_code == 200, raw.text
    # The same answer; each carries its own request id.
    assert {**raw.json(), "request_id": None} == {**multipart, "request_id": None}
    assert raw.json()["request_id"] != multipart["request_id"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b"{}", 415, "unsupported_media_type"),
        ("image/png", b"not a png", 415, "not_an_image"),
        ("image/jpeg", b"", 400, "empty_file"),
        ("image/png", b"x" * (9 * 1024 * 1024), 413, "body_too_large"),
    ],
)
def test_a_bad_raw_body_gets_a_json_4xx(server, content_type, body, status, code):
    response = httpx.post(
        f"{server}/classify", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == code


def test_a_keep_alive_connection_is_recycled_after_its_quota_of_requests(server, test_pngs):
    # MAX_REQUESTS_PER_CONNECTION is 20 as shipped: the 20th answer closes the connection, and
    # the client's next request opens a new one, which either worker may accept.
    with httpx.Client() as client:
        answers = [
            client.post(
                f"{server}/classify", content=test_pngs[0], headers={"content-type": "image/png"}
            )
            for _ in range(45)
        ]
    assert [answer.status_code for answer in answers] == [200] * 45
    closing = [
        n for n, answer in enumerate(answers, 1) if answer.headers.get("connection") == "close"
    ]
    assert closing == [20, 40]
