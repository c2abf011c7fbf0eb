"""The measurements of one benchmark run, each a function returning plain figures."""

from __future__ import annotations

import contextlib
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from benchmarks.servers import ROOT, batch_size_counters, process_tree_rss, run_load, server
from benchmarks.wrk import multipart_body, run_wrk

CONCURRENCY = (1, 8, 32)
BATCH_IMAGES = 64
# The request bodies of the load: each payload as multipart (a browser, curl -F) and raw.
PAYLOAD_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def payload_bodies(payloads: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """``{"png multipart": (body, content type), "png raw": ..., "jpeg multipart": ...}``."""
    bodies = {}
    for name, data in payloads.items():
        content_type = PAYLOAD_TYPES[name]
        bodies[f"{name} multipart"] = multipart_body("image", f"image.{name}", content_type, data)
        bodies[f"{name} raw"] = (data, content_type)
    return bodies


def measure_limit(model_folder: Path, images: list[bytes], repeats: int) -> dict:
    """Decode + preprocess + onnxruntime, batch 1 and batch 64, with all CPUs for onnxruntime."""
    from service.core.classifier import ModelSource, available_cpus, load_classifier

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=available_cpus())

    def one(data: bytes) -> None:
        classifier.predict(classifier.preprocess(data)[np.newaxis])

    def batch(chunk: list[bytes]) -> None:
        classifier.predict(np.stack([classifier.preprocess(data) for data in chunk]))

    for data in images[:10]:
        one(data)
    timings = []
    for index in range(repeats):
        started = time.perf_counter()
        one(images[index % len(images)])
        timings.append(time.perf_counter() - started)
    batch_timings = []
    for _ in range(max(3, repeats // BATCH_IMAGES)):
        started = time.perf_counter()
        batch(images[:BATCH_IMAGES])
        batch_timings.append(time.perf_counter() - started)
    decode = []
    for data in images:
        started = time.perf_counter()
        classifier.preprocess(data)
        decode.append(time.perf_counter() - started)
    return {
        "batch_1": {
            "images_per_second": round(1 / float(np.mean(timings)), 1),
            "p50_ms": round(float(np.median(timings)) * 1000, 3),
        },
        "batch_64": {
            "images_per_second": round(BATCH_IMAGES / float(np.median(batch_timings)), 1),
            "p50_ms": round(float(np.median(batch_timings)) * 1000, 3),
        },
        "decode_preprocess_us": round(float(np.median(decode)) * 1e6, 1),
    }


def _classify_for(model_folder: str, data: bytes, seconds: float) -> int:
    """Classify ``data`` again and again for ``seconds`` in this process, one onnxruntime
    thread: decode, preprocess, predict, postprocess, as one request does. Returns the count."""
    from service.core.classifier import ModelSource, load_classifier

    classifier = load_classifier(ModelSource(Path(model_folder), "bench"), threads=1)
    for _ in range(20):  # warm-up
        classifier.classify(classifier.preprocess(data)[np.newaxis], 1)
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        classifier.classify(classifier.preprocess(data)[np.newaxis], 1)
        count += 1
    return count


def measure_int8(model_folder: Path, images: list[bytes]) -> dict:
    """onnxruntime on one thread, batch 1, for the model and its int8 quantization (calibrated
    here on the sample images: speed only; the training job's int8 gate measures accuracy)."""
    import onnx

    from service.core.classifier import ModelSource, load_classifier
    from training.export.quantize import batch_1_microseconds, one_thread_session, quantize_int8

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=1)
    inputs = np.stack([classifier.preprocess(data) for data in images]).astype(np.float32)
    proto = onnx.load(str(model_folder / "model.onnx"))
    if classifier.contract.precision == "int8":
        return {"skipped": "the model is already int8"}
    quantized = quantize_int8(proto, inputs)
    contract = classifier.contract
    float_us = batch_1_microseconds(one_thread_session(proto), contract, inputs[0], 2000)
    int8_us = batch_1_microseconds(one_thread_session(quantized), contract, inputs[0], 2000)
    return {"batch_1_us_float32": float_us, "batch_1_us_int8": int8_us}


def measure_payload_limits(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """Images/s of one request's work without HTTP, per payload: in one process with one thread,
    and in one process per CPU (all cores; Python's lock rules out threads)."""
    from concurrent.futures import ProcessPoolExecutor

    from service.core.classifier import available_cpus

    cpus = available_cpus()
    limits = {}
    for name, data in payloads.items():
        with ProcessPoolExecutor(1) as pool:
            one = pool.submit(_classify_for, str(model_folder), data, seconds).result()
        with ProcessPoolExecutor(cpus) as pool:
            jobs = [
                pool.submit(_classify_for, str(model_folder), data, seconds) for _ in range(cpus)
            ]
            every = sum(job.result() for job in jobs)
        limits[name] = {
            "one_thread_images_per_second": round(one / seconds, 1),
            "all_cores_images_per_second": round(every / seconds, 1),
            "cores": cpus,
        }
    return limits


def measure_service(
    model_folder: Path,
    image_files: list[Path],
    payloads: dict[str, bytes],
    batching: bool,
    seconds: float,
    with_batch_endpoint: bool,
    payload_names: tuple[str, ...] | None = None,
) -> dict:
    """``/classify`` under wrk at each concurrency, for each payload (the multipart PNG alone
    with batching on, or the ``payload_names`` given), with the server's CPU per request and its
    split across processes."""
    with server(
        "service.service:ImageClassifier", model_folder, BATCHING="1" if batching else "0"
    ) as (url, ready_seconds, pid):
        rss = process_tree_rss(pid)
        bodies = payload_bodies(payloads)
        names = payload_names or (("png multipart",) if batching else tuple(bodies))
        bodies = {name: bodies[name] for name in names}
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in bodies.items():
            runs[name] = []
            for concurrency in CONCURRENCY:
                before = batch_size_counters(url)
                result = run_wrk(
                    f"{url}/classify", body, content_type, concurrency, seconds, server_pid=pid
                )
                after = batch_size_counters(url)
                images, calls = after[0] - before[0], after[1] - before[1]
                result["mean_batch_size"] = round(images / calls, 2) if calls else None
                runs[name].append(result)
        batch_endpoint = None
        if with_batch_endpoint:
            (batch_endpoint,) = run_load(
                url,
                image_files,
                (2,),
                max(4, int(seconds * 10)),
                seconds,
                endpoint="/classify_batch",
                batch=BATCH_IMAGES,
            )
        return {
            "ready_seconds": round(ready_seconds, 2),
            "rss_mib_per_process": [round(size / 2**20, 1) for size in rss],
            "classify": runs[names[0]],
            "payloads": runs,
            "classify_batch": batch_endpoint,
        }


# The production loop's settings, compared in interleaved rounds: nothing kept; every
# prediction recorded for feedback; feedback with the hard inputs captured (as the feedback
# overlay deploys it); and, the worst case, every input also captured.
LOOP_SETTINGS = {
    "off": {},
    "feedback": {"FEEDBACK_TOKEN": "bench"},
    "feedback_capture_hard": {"FEEDBACK_TOKEN": "bench", "CAPTURE": "hard"},
    "feedback_capture_all": {"FEEDBACK_TOKEN": "bench", "CAPTURE": "sample:1"},
}


def measure_loop(
    model_folder: Path, payloads: dict[str, bytes], seconds: float, rounds: int = 2
) -> dict:
    """``/classify`` multipart at concurrency 8 with feedback and capture off and on, each
    setting served ``rounds`` times in interleaved rounds (A, B, C, A, B, C) on a fresh server
    and a fresh store: per setting and payload, the median p50 and images/s over the rounds."""
    import statistics
    import tempfile

    bodies = {name: body for name, body in payload_bodies(payloads).items() if "multipart" in name}
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in LOOP_SETTINGS}
    for _ in range(rounds):
        for name, settings in LOOP_SETTINGS.items():
            with tempfile.TemporaryDirectory() as scratch:
                environment = {"CAPTURE_DIR": f"{scratch}/captured", "FEEDBACK_DIR": scratch}
                with server(
                    "service.service:ImageClassifier", model_folder, **settings, **environment
                ) as (url, _, pid):
                    for payload, (body, content_type) in bodies.items():
                        result = run_wrk(
                            f"{url}/classify", body, content_type, 8, seconds, server_pid=pid
                        )
                        runs[name].setdefault(payload, []).append(result)
    return {
        name: {
            payload: {
                "p50_ms": statistics.median(run["p50_ms"] for run in results),
                "p50_ms_rounds": [run["p50_ms"] for run in results],
                "images_per_second": statistics.median(run["images_per_second"] for run in results),
            }
            for payload, results in by_payload.items()
        }
        for name, by_payload in runs.items()
    }


def measure_plain_fastapi(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """The same work in a plain FastAPI app on uvicorn, as many workers as the service."""
    from service.http.settings import ServiceSettings

    workers = ServiceSettings().api_workers
    with server("benchmarks.plain_fastapi:app", model_folder, uvicorn_workers=workers) as (
        url,
        ready,
        pid,
    ):
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in payload_bodies(payloads).items():
            path = "/classify" if name.endswith("multipart") else "/classify_raw"
            runs[name] = [
                run_wrk(f"{url}{path}", body, content_type, concurrency, seconds, server_pid=pid)
                for concurrency in CONCURRENCY
            ]
    return {"ready_seconds": round(ready, 2), "payloads": runs}


def measure_docs_style(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """The service as BentoML's docs show it (``benchmarks/docs_style_service.py``), multipart,
    as many workers as the service."""
    with server("benchmarks.docs_style_service:DocsStyle", model_folder) as (url, ready, pid):
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in payload_bodies(payloads).items():
            if not name.endswith("multipart"):
                continue  # a PIL image parameter takes a multipart upload
            runs[name] = [
                run_wrk(f"{url}/classify", body, content_type, concurrency, seconds, server_pid=pid)
                for concurrency in CONCURRENCY
            ]
    return {"ready_seconds": round(ready, 2), "payloads": runs}


def measure_cli(model_folder: Path, photo: bytes, files: int) -> dict:
    """The offline CLI (``python -m service.predict``) on a folder of ``files`` copies of a
    photo, with decoding in one process per CPU and in this process only: images/s from its own
    timing (start-up, model load and the output file excluded)."""
    import re
    import subprocess
    import sys
    import tempfile

    from service.core.classifier import available_cpus

    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        for index in range(files):
            (folder / f"{index:05d}.jpg").write_bytes(photo)
        for decoders in (available_cpus(), 1):
            result = subprocess.run(
                [sys.executable, "-m", "service.predict", str(folder), "--model",
                 str(model_folder), "--format", "csv", "--output", str(Path(scratch) / "out.csv"),
                 "--decoders", str(decoders)],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            rate = re.search(r"\(([\d.]+) images/s", result.stdout + result.stderr)
            runs[decoders] = float(rate[1])
    return {
        "files": files,
        "decoders": available_cpus(),
        "images_per_second": runs[available_cpus()],
        "one_process_images_per_second": runs[1],
    }


def measure_naive(model_folder: Path, png: bytes, seconds: float) -> dict:
    body, content_type = multipart_body("image", "image.png", "image/png", png)
    with server("benchmarks.naive_service:NaiveKerasClassifier", model_folder) as (url, ready, _):
        runs = [
            run_wrk(f"{url}/classify", body, content_type, concurrency, seconds)
            for concurrency in CONCURRENCY
        ]
    return {"ready_seconds": round(ready, 2), "classify": runs}


def installed_size(requirements: list[str]) -> float:
    """MiB on disk of the given distributions and everything they require, transitively."""
    import re

    seen: set[str] = set()
    queue = [re.split(r"[<>=!\[;\s]", requirement)[0] for requirement in requirements]
    total = 0
    while queue:
        name = queue.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            distribution = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            continue
        for file in distribution.files or []:
            with contextlib.suppress(OSError):
                total += Path(file.locate()).stat().st_size
        for requirement in distribution.requires or []:
            if "extra ==" in requirement:
                continue
            queue.append(re.split(r"[<>=!\[;\s(]", requirement)[0])
    return round(total / 2**20, 1)


def measure_footprint() -> dict:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    serving = installed_size(base + project["optional-dependencies"]["serve"])
    training = installed_size(base + project["optional-dependencies"]["train"])
    return {
        "serving_mib": serving,
        "training_mib": training,
        "serving_over_training": round(serving / training, 3),
    }
