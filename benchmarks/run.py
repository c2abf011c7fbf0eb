"""``make bench``: the project against its model's in-process limit and against a naive Keras
service, measured side by side in one run, reported as ratios.

    python -m benchmarks [--quick] [--model artifacts/animals/latest]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sklearn.datasets import images as sklearn_images

from benchmarks.drift import measure_detection, measure_serving
from benchmarks.explanations import measure_cam_cost, measure_explain
from benchmarks.measure import (
    BATCH_IMAGES,
    measure_cli,
    measure_docs_style,
    measure_footprint,
    measure_int8,
    measure_limit,
    measure_loop,
    measure_naive,
    measure_payload_limits,
    measure_plain_fastapi,
    measure_service,
    payload_bodies,
)
from benchmarks.prediction_log import measure_prediction_log
from benchmarks.ratios import ratios
from benchmarks.report import format_table, plot
from benchmarks.rollout import measure_shadow, measure_swap
from benchmarks.servers import ROOT
from benchmarks.training_runs import batching_choice, measure_backbone, measure_training

RESULTS = ROOT / "benchmarks" / "results"
# A real photo (640x427 JPEG) that scikit-learn ships: the second payload of the load.
PHOTO = Path(sklearn_images.__file__).parent / "china.jpg"


def machine() -> dict:
    import psutil

    from service.core.classifier import available_cpus

    return {
        "cpus": available_cpus(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


class Phases(dict):
    """The results, timing each phase: the seconds since the previous result was stored."""

    def __init__(self, **items) -> None:
        super().__init__(**items)
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __setitem__(self, key: str, value) -> None:
        super().__setitem__(key, value)
        now = time.perf_counter()
        self.seconds[key] = round(now - self._last, 1)
        self._last = now


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts: a smoke run of every figure"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--report",
        action="store_true",
        help="also rewrite BENCHMARKS.md and its plot in docs/images/",
    )
    return parser.parse_args(argv)


def write_samples(model: Path, folder: str) -> list[Path]:
    """Held-out test images of ``model`` as PNG files, by the training job's ``samples``
    command, in a process of its own: TensorFlow's idle threads would slow the measurements."""
    subprocess.run(
        [sys.executable, "-m", "training", "samples", "--artifact", str(model),
         "--output", folder, "--count", str(BATCH_IMAGES)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return sorted(Path(folder).glob("*.png"))


def measure_served_model(results: Phases, model: Path, image_files: list[Path], quick: bool):
    """Every measurement of the served model, and of the backbone model beside it."""
    seconds = results["seconds_per_point"]
    images = [path.read_bytes() for path in image_files]
    results["limit"] = measure_limit(model, images, 200 if quick else 3000)
    results["int8"] = measure_int8(model, images)
    payloads = {"png": images[0], "jpeg": PHOTO.read_bytes()}
    results["payload_limits"] = measure_payload_limits(model, payloads, 1 if quick else 4)
    results["cli"] = measure_cli(model, payloads["jpeg"], 100 if quick else 2000)
    # As shipped: BATCHING=auto, decided from this model's measured cost.
    results["batching_auto"] = batching_choice(model)
    shipped = results["batching_auto"]["chosen"]
    for batching in ("off", "on"):
        results[f"service_batching_{batching}"] = measure_service(
            model,
            image_files,
            payloads,
            batching == "on",
            seconds,
            with_batch_endpoint=batching == shipped,
            # Every payload as shipped; the other mode is compared on the small PNG alone.
            payload_names=tuple(payload_bodies(payloads)) if batching == shipped else None,
        )
    results["shipped_batching"] = shipped
    results["loop"] = measure_loop(model, payloads, seconds, rounds=1 if quick else 2)
    results["prediction_log"] = measure_prediction_log(
        model, payloads, seconds, rounds=1 if quick else 3
    )
    results["rollout"] = {
        "shadow": measure_shadow(
            model, payloads["png"], seconds, 1 if quick else 3, (2,) if quick else (1, 2)
        ),
        "swap": measure_swap(model, payloads["png"], max(seconds, 3)),
    }
    results["drift"] = {
        "detection": measure_detection(
            model, None, 30 if quick else 200, (200,) if quick else (50, 100, 200, 500, 1000), 0
        ),
    }
    if not quick:  # --quick checks the figures exist; the serving rounds are the full run's
        results["drift"]["serving"] = measure_serving(model, payloads["png"], seconds, 3)
    results["cam_cost"] = measure_cam_cost(model, rounds=2 if quick else 5)
    results["explain"] = measure_explain(
        model, payloads, seconds, 1 if quick else 2, (1,) if quick else (1, 8)
    )
    results["plain_fastapi"] = measure_plain_fastapi(model, payloads, seconds)
    results["docs_style"] = measure_docs_style(model, payloads, seconds)
    # Keras takes seconds per request at 32 connections: a short point would count none
    # (4 s counted none in a test run while the other test worker was busy).
    results["naive_keras"] = measure_naive(model, images[0], max(seconds, 8))
    results["backbone"] = measure_backbone(payloads, seconds, quick)


def save(results: Phases, args: argparse.Namespace) -> None:
    """The run's JSON and plot in the output folder, its table printed (and with ``--report``
    BENCHMARKS.md rewritten)."""
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = args.model.resolve()
    if not (model / "model.onnx").is_file():
        print(f"error: {args.model} has no model.onnx: run 'make train' first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        image_files = write_samples(model, scratch)
        results = Phases(machine=machine(), model=str(args.model), quick=args.quick)
        results["seconds_per_point"] = 1 if args.quick else 10  # per point, after a warm-up
        measure_served_model(results, model, image_files, args.quick)
    results["footprint"] = measure_footprint()
    results["training"] = measure_training(30 if args.quick else None, 3 if args.quick else 4)
    results["ratios"] = ratios(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    # What each measurement took: where a run's time goes (the quick run is a test of the suite).
    results["phase_seconds"] = {
        key: spent for key, spent in results.seconds.items() if isinstance(results[key], dict)
    }
    save(results, args)
    return 0
