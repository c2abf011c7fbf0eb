"""The hot routes' fast path against the two ASGI stacks, and against the plain FastAPI app.

    python -m benchmarks.fast_path --model artifacts/animals/latest --png sample.png

``/classify`` multipart under wrk, the PNG given and a JPEG photo, at 8 and 32 connections, on
three servers started afresh in each of ``--rounds`` interleaved rounds (A, B, C, A, B, C): the
service with ``FAST_PATH=1`` (as shipped), the service with ``FAST_PATH=0`` (the request
through BentoML's router and the mounted FastAPI app), and the plain FastAPI app doing the same
work (benchmarks/plain_fastapi.py, as many uvicorn workers). Prints, per payload and load, each
server's median images/s and p50 over the rounds with every round's figure, and the ratios
(medians over medians). ``make bench`` measures the shipped service against the plain app too;
this compares the two paths in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sklearn.datasets import images as sklearn_images

from benchmarks.servers import over_rounds, parse_rounds_args, server
from benchmarks.wrk import multipart_body, run_wrk

PHOTO = Path(sklearn_images.__file__).parent / "china.jpg"
CONNECTIONS = (8, 32)
SERVERS = {
    "fast_path": ("service.service:ImageClassifier", {"FAST_PATH": "1"}),
    "two_stacks": ("service.service:ImageClassifier", {"FAST_PATH": "0"}),
    "plain_fastapi": ("benchmarks.plain_fastapi:app", {}),
}


def measure(model: Path, png: bytes, seconds: float, rounds: int) -> dict:
    """Every server's runs, by payload and connections, in interleaved rounds."""
    from service.http.settings import ServiceSettings

    workers = ServiceSettings().api_workers
    bodies = {
        "png": multipart_body("image", "a.png", "image/png", png),
        "jpeg": multipart_body("image", "a.jpg", "image/jpeg", PHOTO.read_bytes()),
    }
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in SERVERS}
    for _ in range(rounds):
        for name, (target, env) in SERVERS.items():
            plain = name == "plain_fastapi"
            with server(target, model, uvicorn_workers=workers if plain else 0, **env) as (
                url,
                _,
                pid,
            ):
                for payload, (body, content_type) in bodies.items():
                    for connections in CONNECTIONS:
                        result = run_wrk(
                            f"{url}/classify", body, content_type, connections, seconds, pid
                        )
                        runs[name].setdefault(f"{payload} c{connections}", []).append(result)
    return summarise(runs)


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict:
    figures = {
        name: {
            point: over_rounds(results)
            | {
                "p99_over_p50_worst": round(max(r["p99_ms"] / r["p50_ms"] for r in results), 2),
                "errors": sum(r.get("errors", 0) for r in results),
            }
            for point, results in by_point.items()
        }
        for name, by_point in runs.items()
    }
    ratios = {}
    for point in figures["fast_path"]:
        ours = figures["fast_path"][point]["images_per_second"]
        for other in ("two_stacks", "plain_fastapi"):
            theirs = figures[other][point]["images_per_second"]
            ratios[f"fast_path_vs_{other}_{point.replace(' ', '_')}"] = round(ours / theirs, 3)
    return {"servers": figures, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    args = parse_rounds_args(__doc__, argv)
    if args is None:
        return 2
    results = measure(args.model, args.png.read_bytes(), args.seconds, args.rounds)
    for point in results["servers"]["fast_path"]:
        cells = []
        for name in SERVERS:
            figure = results["servers"][name][point]
            rounds = ", ".join(f"{value:.0f}" for value in figure["images_per_second_rounds"])
            cells.append(
                f"{name} {figure['images_per_second']:.0f}/s [{rounds}] p50 {figure['p50_ms']} ms"
            )
        print(f"{point}: " + " | ".join(cells))
    print(json.dumps(results["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
