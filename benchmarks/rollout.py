"""``python -m benchmarks.rollout``: what a challenger in the shadow costs the served model, and
what a model swap costs under load.

- **Shadow**: ``/classify`` (the multipart PNG) under wrk at 8 connections, the served model
  alone against the same with ``SHADOW_MODEL`` at ``SHADOW_SHARE=1``, in interleaved rounds
  (off, on, off, on, ...), with one API worker (a core to spare on two) and with two (none to
  spare). The challenger is a copy of the served model, so it costs what the champion costs.
  Per setting: p50, p99 and images/s (medians over the rounds), and the share of the images the
  shadow shed.
- **Swap**: the same load on one server watching a ``latest`` link (``MODEL_WATCH_SECONDS=0.5``),
  steady, then while the link moves between two versions every second: p99 and the longest
  request of each.

    python -m benchmarks.rollout --model artifacts/animals/latest --png sample.png
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.servers import parse_rounds_args, scrape, server, total
from benchmarks.wrk import multipart_body, run_wrk
from training.artifacts import point_latest

CONNECTIONS = 8
SWAP_EVERY_SECONDS = 1.0


def _median(results: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in results), 3)


def _shadowed_share(url: str) -> dict:
    samples = scrape(url)
    shadowed = total(samples, "classifier_shadow_predictions_total")
    shed = total(samples, "classifier_shadow_shed_total")
    return {
        "shadowed": shadowed,
        "shed": shed,
        "shed_share": round(shed / max(1, shed + shadowed), 3),
    }


def measure_shadow(model: Path, png: bytes, seconds: float, rounds: int, workers=(1, 2)) -> dict:
    """``{workers: {"off": figures, "shadow": figures}}`` and the ratios, on vs off."""
    body, content_type = multipart_body("image", "a.png", "image/png", png)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        challenger = Path(scratch) / "challenger"
        shutil.copytree(model, challenger)
        for count in workers:
            runs: dict[str, list[dict]] = {"off": [], "shadow": []}
            shed: list[dict] = []
            for _ in range(rounds):
                for setting in runs:
                    env = {"WORKERS": str(count), "BATCHING": "off"}
                    if setting == "shadow":
                        env |= {"SHADOW_MODEL": str(challenger), "SHADOW_SHARE": "1"}
                    with server("service.service:ImageClassifier", model, **env) as (url, _, pid):
                        url_classify = f"{url}/classify"
                        run = run_wrk(url_classify, body, content_type, CONNECTIONS, seconds, pid)
                        runs[setting].append(run)
                        if setting == "shadow":
                            shed.append(_shadowed_share(url))
            figures[f"workers_{count}"] = {
                setting: {
                    "p50_ms": _median(results, "p50_ms"),
                    "p50_ms_rounds": [r["p50_ms"] for r in results],
                    "p99_ms": _median(results, "p99_ms"),
                    "images_per_second": _median(results, "images_per_second"),
                    "images_per_second_rounds": [r["images_per_second"] for r in results],
                }
                for setting, results in runs.items()
            }
            figures[f"workers_{count}"]["shadow"]["shed_share_rounds"] = [
                s["shed_share"] for s in shed
            ]
    ratios = {}
    for key, pair in figures.items():
        on, off = pair["shadow"], pair["off"]
        ratios[f"shadow_p50_vs_off_c8_{key}"] = round(on["p50_ms"] / off["p50_ms"], 3)
        ratios[f"shadow_rps_vs_off_c8_{key}"] = round(
            on["images_per_second"] / off["images_per_second"], 3
        )
    return {"settings": figures, "ratios": ratios}


def measure_swap(model: Path, png: bytes, seconds: float) -> dict:
    """p99 and the longest request under load, steady and while the model swaps every second."""
    body, content_type = multipart_body("image", "a.png", "image/png", png)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "models"
        for version in ("a", "b"):
            shutil.copytree(model, model_dir / version)
        point_latest(model_dir, "a")
        env = {"WORKERS": "2", "BATCHING": "off", "MODEL_WATCH_SECONDS": "0.5"}
        with server("service.service:ImageClassifier", model_dir / "latest", **env) as (
            url,
            _,
            pid,
        ):
            steady = run_wrk(f"{url}/classify", body, content_type, CONNECTIONS, seconds, pid)
            before = total(scrape(url), "classifier_model_swaps_total", outcome="swapped")
            done = threading.Event()

            def swap() -> None:
                time.sleep(min(2.0, seconds))  # run_wrk's warm-up
                version = "a"
                while not done.wait(SWAP_EVERY_SECONDS):
                    version = "b" if version == "a" else "a"
                    point_latest(model_dir, version)

            swapper = threading.Thread(target=swap)
            swapper.start()
            try:
                swapping = run_wrk(f"{url}/classify", body, content_type, CONNECTIONS, seconds, pid)
            finally:
                done.set()
                swapper.join()
            swaps = total(scrape(url), "classifier_model_swaps_total", outcome="swapped") - before
    keys = ("p50_ms", "p99_ms", "max_ms", "images_per_second", "errors")
    return {
        "steady": {key: steady[key] for key in keys},
        "swapping": {key: swapping[key] for key in keys},
        "worker_swaps": int(swaps),
        "ratios": {
            "swap_p99_vs_steady_c8": round(swapping["p99_ms"] / steady["p99_ms"], 3),
            "swap_longest_vs_steady_c8": round(swapping["max_ms"] / steady["max_ms"], 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_rounds_args(__doc__, argv)
    if args is None:
        return 2
    model, png = args.model.resolve(), args.png.read_bytes()
    figures = {
        "shadow": measure_shadow(model, png, args.seconds, args.rounds),
        "swap": measure_swap(model, png, args.seconds),
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
