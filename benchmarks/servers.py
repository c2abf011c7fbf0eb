"""Start servers and drive load at them: what the benchmarks and the soak share."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree_rss(pid: int) -> list[int]:
    import psutil

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    sizes = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "python" in (child.name() or "").lower() or "bentoml" in " ".join(child.cmdline()):
                sizes.append(child.memory_info().rss)
    return sizes


# BentoML picks the port of its process manager's control socket by binding port 0 and letting
# go; another process can take that port before it is bound again ("Address already in use").
# Such a start is simply tried again.
START_ATTEMPTS = 3


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _start(target: str, command: list[str], environment: dict, log) -> tuple:
    """Start ``command + --port P`` and wait for ``/readyz``; returns (process, url, seconds)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log.seek(0)
        log.truncate()
        started = time.perf_counter()
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
        while True:
            if process.poll() is not None:
                log.seek(0)
                output = log.read()
                if "Address already in use" in output and attempt < START_ATTEMPTS:
                    break
                raise RuntimeError(f"{target} exited:\n{output[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return process, url, time.perf_counter() - started
            if time.perf_counter() - started > 180:
                _stop(process)
                raise RuntimeError(f"{target} not ready in 180 s")
            time.sleep(0.05)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def server(target: str, model_folder: Path, *, uvicorn_workers: int = 0, **env: str):
    """``bentoml serve target`` on a free port, or with ``uvicorn_workers`` a plain ASGI app
    ``module:app`` under uvicorn; yields (url, seconds until /readyz, pid)."""
    environment = {**os.environ, "MODEL_PATH": str(model_folder), **env}
    executable = Path(sys.executable).parent / ("uvicorn" if uvicorn_workers else "bentoml")
    command = [str(executable)] + ([] if uvicorn_workers else ["serve"])
    command += [target, "--host", "127.0.0.1"]
    if uvicorn_workers:
        command += ["--workers", str(uvicorn_workers), "--no-access-log"]
    with tempfile.TemporaryFile("w+") as log:
        process, url, ready_seconds = _start(target, command, environment, log)
        try:
            yield url, ready_seconds, process.pid
        finally:
            _stop(process)


def run_load(
    url: str,
    image_files: list[Path],
    concurrency: tuple[int, ...],
    requests: int,
    seconds: float,
    endpoint: str = "/classify",
    batch: int = 1,
) -> list[dict]:
    """The load generator in a process of its own, so it does not share this one's interpreter."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.load",
        "--url",
        url,
        "--endpoint",
        endpoint,
        "--batch",
        str(batch),
        "--requests",
        str(requests),
        "--seconds",
        str(seconds),
        "--warmup",
        str(max(5, requests // 20)),
        "--concurrency",
        *map(str, concurrency),
        "--image",
        *map(str, image_files),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of a scraped metric's samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def batch_size_counters(url: str) -> tuple[float, float]:
    samples = scrape(url)
    return total(samples, "classifier_batch_size_sum"), total(
        samples, "classifier_batch_size_count"
    )


def parse_rounds_args(doc: str, argv: list[str] | None):
    """The options of a benchmark measured in interleaved rounds on one model and one PNG
    (``--model``, ``--rounds``, ``--seconds``, ``--png``); None, with the line printed, when the
    model folder holds no ``model.onnx``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--png", type=Path, required=True, help="the PNG to send (e.g. a sample)")
    args = parser.parse_args(argv)
    if not (args.model / "model.onnx").is_file():
        print(f"error: {args.model} has no model.onnx: run 'make train' first", file=sys.stderr)
        return None
    return args


def over_rounds(results: list[dict]) -> dict:
    """One load point's wrk runs from interleaved rounds: the median p50 and images/s, with
    every round's figure."""
    import statistics

    return {
        "p50_ms": statistics.median(r["p50_ms"] for r in results),
        "p50_ms_rounds": [r["p50_ms"] for r in results],
        "images_per_second": statistics.median(r["images_per_second"] for r in results),
        "images_per_second_rounds": [r["images_per_second"] for r in results],
    }
