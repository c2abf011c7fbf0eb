"""``make bench``: the project against its model's in-process limit and against a naive Keras
service, measured side by side in one run, reported as ratios.

    python -m benchmarks [--quick] [--model artifacts/animals/latest]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONCURRENCY = (1, 8, 32)
BATCH_IMAGES = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the limit: in one process, no HTTP ------------------------------------------------------


def measure_limit(model_folder: Path, images: list[bytes], repeats: int) -> dict:
    """Decode + preprocess + onnxruntime, batch 1 and batch 64, with all CPUs for onnxruntime."""
    from service.model import ModelSource, available_cpus, load_classifier
    from service.preprocessing import preprocess_bytes

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=available_cpus())
    spec = classifier.spec

    def one(data: bytes) -> None:
        classifier.logits(preprocess_bytes(data, spec)[np.newaxis])

    def batch(chunk: list[bytes]) -> None:
        classifier.logits(np.stack([preprocess_bytes(data, spec) for data in chunk]))

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
        preprocess_bytes(data, spec)
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


# --- servers ---------------------------------------------------------------------------------


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


@contextlib.contextmanager
def server(target: str, model_folder: Path, **env: str):
    """``bentoml serve target`` on a free port; yields (url, seconds until /readyz, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "MODEL_PATH": str(model_folder), **env}
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "bentoml"),
                "serve",
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environment,
        )
        try:
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"{target} exited:\n{log.read()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.perf_counter() - started > 180:
                    raise RuntimeError(f"{target} not ready in 180 s")
                time.sleep(0.05)
            yield url, time.perf_counter() - started, process.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


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


def batch_size_counters(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {"classifier_batch_size_sum": 0.0, "classifier_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return values["classifier_batch_size_sum"], values["classifier_batch_size_count"]


def measure_service(
    model_folder: Path,
    image_files: list[Path],
    batching: bool,
    requests: int,
    seconds: float,
    with_batch_endpoint: bool,
) -> dict:
    with server(
        "service.service:ImageClassifier", model_folder, BATCHING="1" if batching else "0"
    ) as (url, ready_seconds, pid):
        rss = process_tree_rss(pid)
        runs = []
        for concurrency in CONCURRENCY:
            before = batch_size_counters(url)
            (result,) = run_load(url, image_files, (concurrency,), requests, seconds)
            after = batch_size_counters(url)
            images, calls = after[0] - before[0], after[1] - before[1]
            result["mean_batch_size"] = round(images / calls, 2) if calls else None
            runs.append(result)
        batch_endpoint = None
        if with_batch_endpoint:
            (batch_endpoint,) = run_load(
                url,
                image_files,
                (2,),
                max(4, requests // BATCH_IMAGES),
                seconds,
                endpoint="/classify_batch",
                batch=BATCH_IMAGES,
            )
        return {
            "ready_seconds": round(ready_seconds, 2),
            "rss_mib_per_process": [round(size / 2**20, 1) for size in rss],
            "classify": runs,
            "classify_batch": batch_endpoint,
        }


def measure_naive(
    model_folder: Path, image_files: list[Path], requests: int, seconds: float
) -> dict:
    with server("benchmarks.naive_service:NaiveKerasClassifier", model_folder) as (url, ready, _):
        runs = run_load(url, image_files, CONCURRENCY, requests, seconds)
    return {"ready_seconds": round(ready, 2), "classify": runs}


# --- footprint ---------------------------------------------------------------------------------


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


# --- training ----------------------------------------------------------------------------------


def measure_training(max_per_class: int | None, epochs: int) -> dict:
    """Images/s of the job's tf.data pipeline against ``model.fit`` on in-memory arrays, same
    model, same images, no augmentation; epochs after the first (graph tracing) only."""
    import keras

    from training.config import TrainConfig
    from training.data import make_dataset, preprocess_in_memory
    from training.train import build_compiled_model, prepare_data

    config = TrainConfig(max_per_class=max_per_class, augment=False, export=False, publish=False)
    data = prepare_data(config)
    train = data.splits.train

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = [*getattr(self, "seconds", []), time.perf_counter() - self.started]

    def images_per_second(fit) -> float:
        keras.utils.set_random_seed(config.seed)
        model = build_compiled_model(config, data.spec, len(data.class_names))
        timer = EpochTimer()
        fit(model, timer)
        return round(len(train) / float(np.median(timer.seconds[1:])), 1)

    pipeline = images_per_second(
        lambda model, timer: model.fit(
            make_dataset(
                data.images,
                train,
                data.targets,
                data.spec,
                config.batch_size,
                training=True,
                seed=config.seed,
            ),
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
    )
    pixels = preprocess_in_memory(data.images.subset(train), data.spec).astype(np.float32)
    in_memory = images_per_second(
        lambda model, timer: model.fit(
            pixels,
            data.targets[train],
            batch_size=config.batch_size,
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
        )
    )
    return {
        "images": len(train),
        "pipeline_images_per_second": pipeline,
        "in_memory_fit_images_per_second": in_memory,
    }


# --- report ------------------------------------------------------------------------------------


def ratios(results: dict) -> dict:
    on, off = results["service_batching_on"], results["service_batching_off"]
    shipped = results[f"service_batching_{results['shipped_batching']}"]
    by_concurrency = {run["concurrency"]: run for run in shipped["classify"]}
    naive = {run["concurrency"]: run for run in results["naive_keras"]["classify"]}
    on_c32 = next(run for run in on["classify"] if run["concurrency"] == 32)
    off_c32 = next(run for run in off["classify"] if run["concurrency"] == 32)
    return {
        "service_vs_naive_c32": round(
            by_concurrency[32]["images_per_second"] / naive[32]["images_per_second"], 2
        ),
        "batch_endpoint_vs_limit": round(
            shipped["classify_batch"]["images_per_second"]
            / results["limit"]["batch_64"]["images_per_second"],
            3,
        ),
        "overhead_ms_c1_p50": round(
            by_concurrency[1]["p50_ms"] - results["limit"]["batch_1"]["p50_ms"], 2
        ),
        "batching_on_vs_off_c32": round(
            on_c32["images_per_second"] / off_c32["images_per_second"], 3
        ),
        "training_pipeline_vs_fit": round(
            results["training"]["pipeline_images_per_second"]
            / results["training"]["in_memory_fit_images_per_second"],
            3,
        ),
    }


TARGETS = {
    "service_vs_naive_c32": (">=", 10),
    "batch_endpoint_vs_limit": (">=", 0.6),
    "overhead_ms_c1_p50": ("<=", 5),
    "training_pipeline_vs_fit": (">=", 0.9),
}


def target_status(name: str, value: float) -> str:
    if name not in TARGETS:
        return "measured"
    sign, bound = TARGETS[name]
    held = value >= bound if sign == ">=" else value <= bound
    return f"{'holds' if held else 'MISSED'} ({sign} {bound})"


def format_table(results: dict) -> str:
    lines = [
        "| measurement | images/s | p50 ms | p95 ms | p99 ms | mean batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    limit = results["limit"]
    lines.append(
        f"| limit, in-process, batch 1 | {limit['batch_1']['images_per_second']} | "
        f"{limit['batch_1']['p50_ms']} | | | 1 |"
    )
    lines.append(
        f"| limit, in-process, batch 64 | {limit['batch_64']['images_per_second']} | "
        f"{limit['batch_64']['p50_ms']} | | | 64 |"
    )
    for key, title in (
        ("service_batching_off", "service, batching off"),
        ("service_batching_on", "service, batching on"),
        ("naive_keras", "naive Keras service"),
    ):
        for run in results[key]["classify"]:
            lines.append(
                f"| {title}, /classify c={run['concurrency']} | {run['images_per_second']} | "
                f"{run['p50_ms']} | {run['p95_ms']} | {run['p99_ms']} | "
                f"{run.get('mean_batch_size') or ''} |"
            )
        batch = results[key].get("classify_batch")
        if batch:
            lines.append(
                f"| {title}, /classify_batch 64 images c=2 | {batch['images_per_second']} | "
                f"{batch['p50_ms']} | {batch['p95_ms']} | {batch['p99_ms']} | |"
            )
    lines += ["", "| ratio | value | target |", "| --- | --- | --- |"]
    lines += [
        f"| `{name}` | {value} | {target_status(name, value)} |"
        for name, value in results["ratios"].items()
    ]
    shipped = results[f"service_batching_{results['shipped_batching']}"]
    footprint = results["footprint"]
    naive_ready = results["naive_keras"]["ready_seconds"]
    lines += [
        "",
        f"- service ready (launch to /readyz 200): {shipped['ready_seconds']} s (target <= 5 s: "
        f"{'holds' if shipped['ready_seconds'] <= 5 else 'MISSED'}); naive Keras: {naive_ready} s",
        f"- resident memory per process of the service: {shipped['rss_mib_per_process']} MiB",
        f"- installed size: serving {footprint['serving_mib']} MiB, training "
        f"{footprint['training_mib']} MiB, ratio {footprint['serving_over_training']} "
        f"(target < 0.25: {'holds' if footprint['serving_over_training'] < 0.25 else 'MISSED'})",
        f"- training: tf.data pipeline {results['training']['pipeline_images_per_second']} "
        f"images/s, in-memory fit {results['training']['in_memory_fit_images_per_second']} "
        "images/s",
        f"- decode + preprocess of one PNG: {results['limit']['decode_preprocess_us']} us",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, title in (
        ("service_batching_off", "service, batching off"),
        ("service_batching_on", "service, batching on"),
        ("naive_keras", "naive Keras"),
    ):
        runs = results[key]["classify"]
        levels = [run["concurrency"] for run in runs]
        throughput.plot(levels, [run["images_per_second"] for run in runs], marker="o", label=title)
        latency.plot(levels, [run["p99_ms"] for run in runs], marker="o", label=title)
    throughput.axhline(
        results["limit"]["batch_1"]["images_per_second"],
        linestyle="--",
        color="grey",
        label="in-process limit, batch 1",
    )
    for axes, label in ((throughput, "images/s"), (latency, "p99 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    latency.set_yscale("log")
    throughput.legend(fontsize=8)
    figure.suptitle("/classify, single-image requests")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def machine() -> dict:
    import psutil

    from service.model import available_cpus

    return {
        "cpus": available_cpus(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument("--quick", action="store_true", help="tiny counts, under 2 minutes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--report",
        action="store_true",
        help="also rewrite BENCHMARKS.md and its plot in docs/images/",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = args.model.resolve()
    if not (model / "model.onnx").is_file():
        print(f"error: {args.model} has no model.onnx: run 'make train' first", file=sys.stderr)
        return 2
    requests, seconds = (60, 10) if args.quick else (1500, 40)
    naive_requests = 20 if args.quick else 300
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        # In a process of its own: TensorFlow's idle threads would slow the measurements here.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "training",
                "samples",
                "--artifact",
                str(model),
                "--output",
                scratch,
                "--count",
                str(BATCH_IMAGES),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        image_files = sorted(Path(scratch).glob("*.png"))
        images = [path.read_bytes() for path in image_files]
        results: dict = {"machine": machine(), "model": str(args.model), "quick": args.quick}
        results["limit"] = measure_limit(model, images, 200 if args.quick else 3000)
        from service.settings import ServiceSettings

        shipped = "on" if ServiceSettings().batching else "off"
        for batching in ("off", "on"):
            results[f"service_batching_{batching}"] = measure_service(
                model,
                image_files,
                batching == "on",
                requests,
                seconds,
                with_batch_endpoint=batching == shipped,
            )
        results["shipped_batching"] = shipped
        results["naive_keras"] = measure_naive(model, image_files, naive_requests, seconds)
    results["footprint"] = measure_footprint()
    results["training"] = measure_training(30 if args.quick else None, 3 if args.quick else 4)
    results["ratios"] = ratios(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.output / f"{stamp}.png")
    table = format_table(results)
    print(table)
    print(f"\nresults: {args.output / f'{stamp}.json'} ({results['seconds']} s)")
    if args.report:
        from benchmarks.report import write_report

        write_report(results, table, args.output / f"{stamp}.png")
    return 0
