"""``python -m benchmarks.compare``: the service of an earlier commit against the working tree,
``/classify`` multipart under ``wrk``, in interleaved rounds (before, after, before, after, ...)
on two servers started once, with each round's figures and their medians.

    python -m benchmarks.compare --before HEAD~1 --model artifacts/animals/latest --png x.png

The earlier commit is checked out into a temporary worktree (``git worktree``) and served from
there with this checkout's environment, so that only the code differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.servers import ROOT, free_port
from benchmarks.wrk import multipart_body, run_wrk

READY_SECONDS = 180


@contextlib.contextmanager
def worktree(reference: str):
    """``reference`` checked out in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="compare-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(folder), reference],
        cwd=ROOT,
        check=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT)


@contextlib.contextmanager
def serving(tree: Path, model: Path, workers: int, env: dict[str, str]):
    """``bentoml serve`` of the service in ``tree`` on a free port; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        environment = {
            **os.environ,
            "MODEL_PATH": str(model),
            "WORKERS": str(workers),
            "BENTOML_HOME": home,  # each its own metrics folder
            "PYTHONPATH": str(tree),
            **env,
        }
        command = [str(Path(sys.executable).parent / "bentoml"), "serve"]
        command += ["service.service:ImageClassifier", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            command,
            cwd=tree,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + READY_SECONDS
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: the service of {tree} did not start")
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def summary(runs: list[dict]) -> dict:
    rates = [run["images_per_second"] for run in runs]
    p50 = [run["p50_ms"] for run in runs]
    return {
        "images_per_second": statistics.median(rates),
        "images_per_second_rounds": rates,
        "p50_ms": statistics.median(p50),
        "p50_ms_rounds": p50,
        "errors": sum(run["errors"] for run in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git reference)")
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument("--png", type=Path, required=True, help="a PNG the model takes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per load point")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for both servers (repeatable)"
    )
    args = parser.parse_args(argv)
    if not (args.model / "model.onnx").is_file():
        print(f"error: {args.model} has no model.onnx: run 'make train' first", file=sys.stderr)
        return 2
    env = dict(item.split("=", 1) for item in args.env)
    from sklearn.datasets import images as sklearn_images

    payloads = {
        "png": (args.png.read_bytes(), "image/png"),
        "jpeg": ((Path(sklearn_images.__file__).parent / "china.jpg").read_bytes(), "image/jpeg"),
    }
    results: dict = {}
    with (
        worktree(args.before) as earlier,
        serving(earlier, args.model.resolve(), args.workers, env) as before,
        serving(ROOT, args.model.resolve(), args.workers, env) as after,
    ):
        for payload, (data, content_type) in payloads.items():
            body, body_type = multipart_body("image", f"image.{payload}", content_type, data)
            for round_ in range(args.rounds):
                for name, url in (("before", before), ("after", after)):
                    point = (args.connections, args.seconds)
                    run = run_wrk(f"{url}/classify", body, body_type, *point)
                    results.setdefault(payload, {}).setdefault(name, []).append(run)
                    print(
                        f"{payload} {name} round {round_ + 1}: {run['images_per_second']} img/s, "
                        f"p50 {run['p50_ms']} ms, {run['errors']} errors",
                        flush=True,
                    )
    report = {
        payload: {name: summary(runs) for name, runs in sides.items()}
        for payload, sides in results.items()
    }
    print(json.dumps({"before": args.before, **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
