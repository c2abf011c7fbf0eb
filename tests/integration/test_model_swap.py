"""A new model version without a restart: a real ``bentoml serve`` (two workers) watching the
``latest`` link of an artifact folder swaps to each version published there under ``wrk`` load,
with no failed request, each answer naming the version that produced it; a broken version is
refused, counted, and the served one keeps serving; an operator's call swaps at once."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import httpx
import onnx
import pytest

from benchmarks.servers import scrape, total
from benchmarks.servers import server as serve_on_free_port
from benchmarks.wrk import multipart_body, run_wrk
from service.core.contract import ModelContract
from tests.helpers import encode_image
from training.artifacts import point_latest

pytestmark = [pytest.mark.slow]

ADMIN = "admin-token"
WATCH_SECONDS = 0.5


def publish(tiny_run, model_dir: Path, version: str, corrupt=None) -> Path:
    """A copy of the tiny model as ``version``, its labels suffixed with it (so that an answer
    shows which version's contract made it); ``corrupt(folder)`` breaks it. Not yet latest."""
    folder = model_dir / version
    shutil.copytree(tiny_run["folder"], folder)
    proto = onnx.load(folder / "model.onnx")
    contract = ModelContract.read_from_onnx(proto)
    labels = tuple(f"{label}-{version}" for label in contract.labels)
    dataclasses.replace(contract, version=version, labels=labels).write_to_onnx(proto)
    onnx.save(proto, folder / "model.onnx")
    if corrupt is not None:
        corrupt(folder)
    return folder


@pytest.fixture(scope="module")
def watched(tiny_run, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("swap") / "tiny"
    model_dir.mkdir()
    publish(tiny_run, model_dir, "v1")
    point_latest(model_dir, "v1")
    with serve_on_free_port(
        "service.service:ImageClassifier",
        model_dir / "latest",
        WORKERS="2",
        BATCHING="off",
        MODEL_WATCH_SECONDS=str(WATCH_SECONDS),
        ADMIN_TOKEN=ADMIN,
    ) as (url, _, _pid):
        yield {"url": url, "model_dir": model_dir, "tiny_run": tiny_run}


@pytest.fixture(scope="module")
def image() -> bytes:
    from training.data.sources import load_animals

    return encode_image(load_animals().pixels[0], "PNG")


def answer_versions(url: str, image: bytes, seconds: float) -> list[tuple[int, str, str]]:
    """(status, version, label) of each /classify answer for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            response = client.post(f"{url}/classify", files={"image": ("a.png", image)})
            body = response.json()
            version = body.get("model", {}).get("version", "")
            seen.append((response.status_code, version, body.get("label", "")))
    return seen


def wait_for_version(url: str, image: bytes, version: str, timeout: float = 30) -> None:
    """Until 20 answers in a row (both workers') come from ``version``."""
    deadline, streak = time.monotonic() + timeout, 0
    with httpx.Client(timeout=30) as client:
        while streak < 20:
            assert time.monotonic() < deadline, f"still not serving {version}"
            response = client.post(f"{url}/classify", files={"image": ("a.png", image)})
            streak = streak + 1 if response.json()["model"]["version"] == version else 0


def test_three_swaps_under_load_fail_no_request_and_each_answer_names_its_version(watched, image):
    url, model_dir = watched["url"], watched["model_dir"]
    wait_for_version(url, image, "v1")
    before = total(scrape(url), "classifier_model_swaps_total", outcome="swapped")
    for version in ("v2", "v3", "v4"):
        publish(watched["tiny_run"], model_dir, version)
    body, content_type = multipart_body("image", "a.png", "image/png", image)
    loads: list[dict] = []
    load = threading.Thread(
        target=lambda: loads.append(run_wrk(f"{url}/classify", body, content_type, 4, 10))
    )
    answers: list[tuple[int, str, str]] = []
    checker = threading.Thread(target=lambda: answers.extend(answer_versions(url, image, 11)))
    load.start()
    checker.start()
    time.sleep(2.5)  # wrk's warm-up; the swaps fall in its measured 10 s
    for version in ("v2", "v3", "v4"):
        point_latest(model_dir, version)
        time.sleep(3)
    load.join()
    checker.join()
    (figures,) = loads
    print(f"\nthree swaps under wrk -c4: {figures}; {len(answers)} answers checked")
    assert figures["requests"] > 100 and figures["errors"] == 0, figures
    assert {status for status, _, _ in answers} == {200}
    # Each answer's labels are those of the version it names: it was made by that version.
    for _, version, label in answers:
        assert label == "unknown" or label.endswith(f"-{version}"), (version, label)
    versions = [version for _, version, _ in answers]
    assert {"v2", "v3", "v4"} <= set(versions), sorted(set(versions))
    wait_for_version(url, image, "v4")
    swapped = total(scrape(url), "classifier_model_swaps_total", outcome="swapped")
    assert swapped - before == 3 * 2  # each of the two workers swapped to each version
    info = httpx.get(f"{url}/model").json()
    assert info["version"] == "v4" and info["labels"][0].endswith("-v4")


def broken_versions() -> dict:
    def missing_output(folder: Path) -> None:
        proto = onnx.load(folder / "model.onnx")
        proto.graph.output.pop()  # the last output (the detector's score or the map)
        onnx.save(proto, folder / "model.onnx")

    def wrong_input_shape(folder: Path) -> None:
        proto = onnx.load(folder / "model.onnx")
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        dims[1].dim_value = dims[1].dim_value + 3  # a height the contract does not say
        onnx.save(proto, folder / "model.onnx")

    def corrupt_file(folder: Path) -> None:
        (folder / "model.onnx").write_bytes(b"\x08\x07not a protobuf" * 100)

    return {"missing-output": missing_output, "wrong-shape": wrong_input_shape,
            "corrupt": corrupt_file}  # fmt: skip


def test_a_broken_version_is_refused_counted_and_the_served_one_keeps_serving(watched, image):
    url, model_dir = watched["url"], watched["model_dir"]
    served = httpx.get(f"{url}/model").json()["version"]
    for name, corrupt in broken_versions().items():
        before = total(scrape(url), "classifier_model_swaps_total", outcome="refused")
        publish(watched["tiny_run"], model_dir, name, corrupt)
        point_latest(model_dir, name)
        deadline = time.monotonic() + 30
        while total(scrape(url), "classifier_model_swaps_total", outcome="refused") < before + 2:
            assert time.monotonic() < deadline, f"{name} was not refused by both workers"
            time.sleep(0.2)
        # Refused once per worker, not once per look at the source.
        time.sleep(4 * WATCH_SECONDS)
        assert total(scrape(url), "classifier_model_swaps_total", outcome="refused") == before + 2
        answers = answer_versions(url, image, 1.0)
        assert answers and {(status, version) for status, version, _ in answers} == {
            (200, served)
        }, name
    # The operator's call answers why, in the API's error shape.
    response = httpx.post(
        f"{url}/admin/model/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "model_refused" and "corrupt" in body["source"]
    assert body["model"]["version"] == served and "not a loadable ONNX model" in body["detail"]
    errors = total(scrape(url), "classifier_requests_total", code="500")
    assert errors == 0


def test_an_operators_call_swaps_at_once_and_needs_its_token(watched, image):
    url, model_dir = watched["url"], watched["model_dir"]
    reload = f"{url}/admin/model/reload"
    assert httpx.post(reload).status_code == 401
    wrong = httpx.post(reload, headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]) == (401, "unauthorized")
    publish(watched["tiny_run"], model_dir, "v5")
    point_latest(model_dir, "v5")
    response = httpx.post(reload, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    # The worker that took the call swapped now, or its poll had just done it.
    assert body["outcome"] in ("swapped", "unchanged") and body["model"]["version"] == "v5"
    wait_for_version(url, image, "v5")
