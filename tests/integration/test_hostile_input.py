"""Hostile and malformed requests against a real ``bentoml serve`` (2 workers, feedback and
capture on): every one gets a 4xx JSON answer with its code (or, for headers, the connection's
own 408/431), the worker's memory stays within the bound the settings give and returns after a
burst, the event loop keeps answering, and ``/readyz`` stays ready."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.servers import scrape, total
from benchmarks.servers import server as serve_on_free_port
from service.core.preprocessing import DEFAULT_MAX_DECODED_BYTES
from tests.helpers import ROOT, api_workers

pytestmark = [pytest.mark.slow]

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEADER_TIMEOUT = 2
# Long enough for a burst of large images on a loaded machine (its batches took over 3 s on two
# busy cores), short enough for the timeout test to wait it out.
REQUEST_TIMEOUT = 10
IN_FLIGHT = 2


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    with serve_on_free_port(
        "service.service:ImageClassifier",
        tiny_run["folder"],
        WORKERS="2",
        FEEDBACK_TOKEN=TOKEN,
        FEEDBACK_DIR=str(folder / "log"),
        CAPTURE="sample:1",
        CAPTURE_DIR=str(folder / "captured"),
        HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT),
        MAX_DECODES_IN_FLIGHT=str(IN_FLIGHT),
    ) as (url, _, pid):
        workers = api_workers(pid)
        model = httpx.get(f"{url}/model").json()["name"]
        yield {"url": url, "workers": workers, "model": model, "folder": folder}


def infer_body(data, datatype="UINT8", shape=(1, 28, 28, 1), **extra) -> str:
    tensor = {"name": "image", "datatype": datatype, "shape": list(shape), "data": data}
    return json.dumps({"inputs": [tensor], **extra})


PIXELS = [0] * 784


def test_every_malformed_request_gets_a_4xx_json_error_with_its_code(hostile):
    url, model = hostile["url"], hostile["model"]
    infer = f"{url}/v2/models/{model}/infer"
    deep = b"[" * 100_000 + b"]" * 100_000
    probes = [
        ("post", infer, {"content": infer_body([300] * 784)}, 400, "invalid_data"),
        ("post", infer, {"content": infer_body([-1] * 784)}, 400, "invalid_data"),
        ("post", infer, {"content": infer_body([3e38] * 784, "FP32")}, 400, "invalid_data"),
        ("post", infer, {"content": infer_body(PIXELS, shape=(True, 28, 28, 1))}, 400,
         "invalid_shape"),
        ("post", infer, {"content": infer_body(PIXELS, parameters=[1])}, 400,
         "invalid_parameters"),
        ("post", infer, {"content": infer_body(PIXELS, parameters="x")}, 400,
         "invalid_parameters"),
        ("post", infer, {"content": infer_body(
            PIXELS, outputs=[{"name": "probabilities", "parameters": "x"}])}, 400,
         "invalid_parameters"),
        ("post", infer, {"content": deep}, 400, "json_too_deep"),
        ("post", infer, {"content": infer_body(PIXELS).encode(),
                         "headers": {"Inference-Header-Content-Length": "²".encode()}}, 400,
         "invalid_header"),
        ("post", infer, {"content": b"[" + b"0," * 20_000_000 + b"0]"}, 413, "body_too_large"),
        ("post", f"{url}/feedback", {"content": deep, "headers": AUTH}, 400, "json_too_deep"),
        ("post", f"{url}/feedback", {"content": b"[1, 2", "headers": AUTH}, 400, "invalid_json"),
        ("post", f"{url}/classify", {"files": {"image": ("big.png",
                                                        png(np.zeros((6300, 6300, 4), np.uint8)))}},
         413, "image_too_large"),
    ]  # fmt: skip
    for label in ("..", " ..", "a/b", "a\\b", "a\x00b", ".hidden", "C:", "nul"):
        body = {"request_id": "x", "label": label}
        probes.append(("post", f"{url}/feedback", {"json": body, "headers": AUTH}, 400,
                       "invalid_label"))  # fmt: skip
    with httpx.Client(timeout=60) as client:
        for method, target, arguments, status, code in probes:
            started = time.perf_counter()
            response = getattr(client, method)(target, **arguments)
            assert (response.status_code, response.json()["error"]) == (status, code), (
                target,
                response.text[:300],
            )
            assert time.perf_counter() - started < 30
            assert "NaN" not in response.text and "Infinity" not in response.text
        assert client.get(f"{url}/readyz").status_code == 200
    errors = total(scrape(url), "classifier_requests_total", code="500")
    assert errors == 0


def rss_mib(workers) -> dict[int, float]:
    return {worker.pid: worker.memory_info().rss / 2**20 for worker in workers}


def test_a_burst_of_large_images_stays_within_the_bound_and_the_memory_comes_back(hostile):
    url, workers = hostile["url"], hostile["workers"]
    small = png(np.zeros((28, 28), np.uint8))
    # 4000x4000 RGBA: a 94 KB file that takes 122 MiB to decode and premultiply, just under
    # the limit.
    pixels = np.zeros((4000, 4000, 4), np.uint8)
    pixels[::7, ::5] = 200
    large = png(pixels)
    with httpx.Client(timeout=60) as client:
        for _ in range(40):
            client.post(f"{url}/classify", files={"image": ("a.png", small)})
    steady = rss_mib(workers)
    peak, done = dict(steady), threading.Event()
    livez: list[float] = []

    def watch() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                for pid, value in rss_mib(workers).items():
                    peak[pid] = max(peak[pid], value)
                started = time.perf_counter()
                assert client.get(f"{url}/livez").status_code == 200
                livez.append(time.perf_counter() - started)
                time.sleep(0.02)

    answers: list[int] = []

    def burst() -> None:
        files = [("images", (f"{i}.png", large)) for i in range(3)]
        with httpx.Client(timeout=120) as client:
            answers.append(client.post(f"{url}/classify_batch", files=files).status_code)

    watcher = threading.Thread(target=watch)
    watcher.start()
    bursts = [threading.Thread(target=burst) for _ in range(4)]
    for thread in bursts:
        thread.start()
    for thread in bursts:
        thread.join()
    done.set()
    watcher.join()
    # Each is answered, or refused with busy while the decodes and their queue are full.
    assert set(answers) <= {200, 503} and 200 in answers
    # The bound: each decode in flight holds at most the limit (the image and its conversion).
    bound = IN_FLIGHT * DEFAULT_MAX_DECODED_BYTES / 2**20
    for pid in steady:
        assert peak[pid] - steady[pid] <= bound + 64, (peak, steady)
    # The event loop answered while the workers decoded.
    assert max(livez) < 1.0, max(livez)
    with httpx.Client(timeout=60) as client:
        for _ in range(40):
            client.post(f"{url}/classify", files={"image": ("a.png", small)})
        assert client.get(f"{url}/readyz").status_code == 200
    after = rss_mib(workers)
    for pid in steady:
        assert after[pid] <= steady[pid] * 1.2, (after, steady)


def raw_exchange(url: str, payload: bytes, wait: float = 10) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.settimeout(wait)
        # The server may answer and close before the client has finished sending.
        with contextlib.suppress(OSError):
            connection.sendall(payload)
        try:
            return connection.recv(4096)
        except OSError as error:
            return repr(error).encode()


def test_headers_past_their_size_count_or_time_are_refused_and_the_connection_closed(hostile):
    url = hostile["url"]
    big = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert raw_exchange(url, big).startswith(b"HTTP/1.1 431 ")
    many = b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    answer = raw_exchange(url, many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in answer
    fine = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000 + b"\r\n\r\n"
    assert raw_exchange(url, fine).startswith(b"HTTP/1.1 200 ")
    # A slowloris: a header line every 0.5 s, never the end of the headers.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"GET /livez HTTP/1.1\r\n")
        connection.settimeout(0.5)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < HEADER_TIMEOUT + 10:
            try:
                connection.sendall(b"X-Slow: 1\r\n")
                answer = connection.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"headers_timeout"' in answer, answer
    assert HEADER_TIMEOUT - 0.5 <= waited <= HEADER_TIMEOUT + 5
    # A connection that sends nothing is closed without an answer a pooled client could take
    # for the answer to its next request.
    with socket.create_connection((host, int(port))) as connection:
        connection.settimeout(HEADER_TIMEOUT + 10)
        assert connection.recv(4096) == b""


def test_a_request_that_outlasts_the_timeout_is_a_504_counted_as_one(hostile):
    url = hostile["url"]
    before = total(scrape(url), "classifier_requests_total", code="504")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        connection.settimeout(0.5)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < REQUEST_TIMEOUT + 10 and not answer:
            try:
                connection.sendall(b"x")  # the body, a byte at a time
                answer = connection.recv(4096)
            except TimeoutError:
                continue
        # The head and the body may come in separate reads: read on until the server closes.
        while answer and time.monotonic() - started < REQUEST_TIMEOUT + 20:
            try:
                more = connection.recv(4096)
            except TimeoutError:
                continue
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 504 ") and b'"error": "timeout"' in answer, answer
    samples = scrape(url)
    assert total(samples, "classifier_requests_total", code="504") == before + 1
    assert total(samples, "classifier_requests_total", code="500") == 0


def test_a_file_padded_far_past_its_image_is_answered_but_not_kept(hostile):
    url = hostile["url"]
    padded = png(np.zeros((28, 28), np.uint8)) + b"\0" * (5 * 1024 * 1024)
    samples = scrape(url)
    refused = total(samples, "classifier_capture_refused_total", reason="oversized")
    captured = total(samples, "classifier_captured_total")
    response = httpx.post(f"{url}/classify", files={"image": ("p.png", padded)}, timeout=60)
    assert response.status_code == 200
    deadline = time.monotonic() + 30
    while total(scrape(url), "classifier_capture_refused_total", reason="oversized") == refused:
        assert time.monotonic() < deadline, "the padded file was not refused by the store"
        time.sleep(0.1)
    assert total(scrape(url), "classifier_captured_total") == captured
    store = hostile["folder"] / "captured"
    assert all(path.stat().st_size < 1024 * 1024 for path in store.glob("*/input.*")), (
        "a padded input was kept"
    )


def test_a_trained_artifact_is_readable_by_another_user_of_its_group(tiny_run):
    """The training Job writes as user 1000 of group 1034; the serving pods and the batch Jobs
    read as user 1034 of that group (k8s/): every file must be group-readable."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    source = tiny_run["folder"]
    for path in [source, *source.rglob("*")]:
        wanted = 0o050 if path.is_dir() else 0o040
        assert path.stat().st_mode & wanted == wanted, (path, oct(path.stat().st_mode))
    scratch = tempfile.mkdtemp()
    try:
        os.chmod(scratch, 0o711)
        copy = os.path.join(scratch, "artifact")
        shutil.copytree(source, copy, copy_function=shutil.copy2)  # modes kept
        for root, folders, files in os.walk(copy):
            for name in [root, *(os.path.join(root, entry) for entry in folders + files)]:
                os.chown(name, 1000, 1034)
        read_all = (
            "import pathlib, sys; from service.core.classifier import ModelSource, "
            "load_classifier; files = [p.read_bytes() for p in pathlib.Path(sys.argv[1])"
            ".rglob('*') if p.is_file()]; load_classifier(ModelSource(pathlib.Path(sys.argv[1]),"
            " 'x')); print(len(files))"
        )
        result = subprocess.run(
            ["setpriv", "--reuid=1034", "--regid=1034", "--clear-groups", sys.executable,
             "-c", read_all, copy],
            capture_output=True, text=True, timeout=120, cwd=str(ROOT),
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert int(result.stdout.split()[-1]) >= 3
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
