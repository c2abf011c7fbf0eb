"""``make soak``: a bounded run of many clients against a real ``bentoml serve`` on loopback,
mixing good images with about 10% bad input, killing one worker half-way, then checking answers,
status codes, memory and the metrics counters.

    python -m benchmarks.soak --model artifacts/animals/latest --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from benchmarks.servers import ROOT, server

BODY_LIMIT = 2 * 1024 * 1024
# Each kind of bad input, and the status and error code the API must answer it with.
BAD_INPUTS = {
    "random_bytes": (415, "not_an_image"),
    "truncated_png": (400, "corrupt_image"),
    "zero_bytes": (400, "empty_file"),
    "pixel_bomb": (413, "image_too_large"),
    "wrong_field": (400, "missing_field"),
    "oversized_body": (413, "body_too_large"),
}


def bad_request(kind: str, good: bytes, rng: random.Random) -> dict:
    """httpx ``files`` for one bad request of ``kind``."""
    if kind == "random_bytes":
        return {"image": ("x.png", rng.randbytes(rng.randint(1, 4096)))}
    if kind == "truncated_png":
        noise = Image.fromarray(
            np.random.default_rng(rng.randint(0, 999)).integers(0, 255, (64, 64), dtype=np.uint8)
        )
        buffer = io.BytesIO()
        noise.save(buffer, format="PNG")
        data = buffer.getvalue()
        return {"image": ("t.png", data[: len(data) // 2])}
    if kind == "zero_bytes":
        return {"image": ("z.png", b"")}
    if kind == "pixel_bomb":
        buffer = io.BytesIO()
        Image.new("L", (8000, 6000)).save(buffer, format="PNG")  # 48 Mpx in a few KiB
        return {"image": ("bomb.png", buffer.getvalue())}
    if kind == "wrong_field":
        return {"picture": ("a.png", good)}
    if kind == "oversized_body":
        return {"image": ("big.png", b"\0" * (BODY_LIMIT + 1024))}
    raise ValueError(kind)


def service_processes(pid: int) -> list[psutil.Process]:
    """The live worker processes of the server started as ``pid``."""
    workers = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(process.cmdline()):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return workers


async def soak(
    url: str,
    pid: int,
    images: list[bytes],
    expected: list[str],
    duration: float,
    concurrency: int,
    bad_ratio: float,
    seed: int,
) -> dict:
    rng = random.Random(seed)
    sent: Counter = Counter()
    statuses: Counter = Counter()
    wrong_labels: list[dict] = []
    unexpected: list[dict] = []
    killed: dict = {}
    memory_mid: dict[int, float] = {}
    deadline = time.monotonic() + duration
    kill_at = time.monotonic() + duration / 2

    async def client(client_id: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                if rng.random() < bad_ratio:
                    kind = rng.choice(list(BAD_INPUTS))
                    files = bad_request(kind, images[0], rng)
                else:
                    index = rng.randrange(len(images))
                    kind, files = f"good:{index}", {"image": ("g.png", images[index])}
                try:
                    response = await http.post("/classify", files=files)
                except httpx.HTTPError as error:
                    near_kill = killed and time.monotonic() - killed["monotonic"] < 3
                    prefix = "in_flight_on_killed_worker:" if near_kill else ""
                    statuses[f"{prefix}{type(error).__name__} ({kind.split(':')[0]})"] += 1
                    sent[kind.split(":")[0]] += 1
                    continue
                sent[kind.split(":")[0]] += 1
                statuses[str(response.status_code)] += 1
                if kind.startswith("good:"):
                    index = int(kind.split(":")[1])
                    if response.status_code != 200:
                        unexpected.append({"kind": "good", "status": response.status_code})
                    elif response.json()["label"] != expected[index]:
                        wrong_labels.append({"image": index, "got": response.json()["label"]})
                else:
                    status, code = BAD_INPUTS[kind]
                    body = (
                        response.json()
                        if "json" in response.headers.get("content-type", "")
                        else {}
                    )
                    if response.status_code != status or body.get("error") != code:
                        unexpected.append(
                            {"kind": kind, "status": response.status_code, "body": str(body)[:200]}
                        )

    async def killer() -> None:
        if pid is None:
            return
        await asyncio.sleep(max(0.0, kill_at - time.monotonic()))
        victim = service_processes(pid)[0]
        killed.update(pid=victim.pid, at_seconds=round(duration / 2, 1), monotonic=time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)
        # Once the restarted worker has taken load, the memory every worker then holds is the
        # baseline for leak detection over the rest of the run.
        await asyncio.sleep(min(5.0, duration / 4))
        memory_mid.update({process.pid: rss_mib([process]) for process in service_processes(pid)})

    await asyncio.gather(killer(), *(client(index) for index in range(concurrency)))
    return {
        "sent": dict(sent),
        "statuses": dict(statuses),
        "wrong_labels": wrong_labels,
        "unexpected": unexpected,
        "killed_worker": killed,
        "memory_mid": memory_mid,
    }


def scrape_counters(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    errors: Counter = Counter()
    predictions = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "classifier_request_errors_total":
                errors[sample.labels["error"]] += sample.value
            elif sample.name == "classifier_predictions_total":
                predictions += sample.value
    return {"errors": dict(errors), "predictions": predictions}


def rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return round(total / 2**20, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def sample_images(model: Path) -> tuple[list[bytes], list[str]]:
    """50 built-in images as PNG, and the label the model gives each offline in onnxruntime."""
    from service.core.classifier import ModelSource, load_classifier
    from training.data.sources import load_animals

    offline = load_classifier(ModelSource(model, "offline"))
    animals = load_animals()
    images = []
    for index in range(0, len(animals.pixels), len(animals.pixels) // 50):
        buffer = io.BytesIO()
        Image.fromarray(animals.pixels[index]).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    expected = [
        offline.classify(offline.preprocess(data)[None], 1).to_dicts()[0]["label"]
        for data in images
    ]
    return images, expected


def soak_a_server(model: Path, images: list[bytes], expected: list[str], args) -> dict:
    """The load with faults against a real two-worker server: what it answered, its memory and
    its error counters before and after."""
    with server(
        "service.service:ImageClassifier", model, WORKERS="2", MAX_REQUEST_BYTES=str(BODY_LIMIT)
    ) as (url, _ready, pid):
        asyncio.run(soak(url, None, images, expected, 3, 4, 0.0, args.seed))  # warm-up
        memory_start = rss_mib(service_processes(pid))
        counters_start = scrape_counters(url)
        result = asyncio.run(
            soak(
                url,
                pid,
                images,
                expected,
                args.duration,
                args.concurrency,
                args.bad_ratio,
                args.seed,
            )
        )
        time.sleep(1)
        counters_end = scrape_counters(url)
        at_end = {process.pid: rss_mib([process]) for process in service_processes(pid)}
        steady = [pid_ for pid_ in result["memory_mid"] if pid_ in at_end]
        memory = {
            "start_mib": memory_start,
            "end_mib": round(sum(at_end.values()), 1),
            "after_kill_mib": round(sum(result["memory_mid"][p] for p in steady), 1),
            "end_of_same_processes_mib": round(sum(at_end[p] for p in steady), 1),
        }
        still_answering = (
            httpx.post(f"{url}/classify", files={"image": ("g.png", images[0])}).status_code == 200
        )
    return {
        "result": result,
        "memory": memory,
        "counters_start": counters_start,
        "counters_end": counters_end,
        "still_answering": still_answering,
    }


def judge(soaked: dict, args) -> dict:
    """The soak's report and its checks."""
    result, memory, still_answering = soaked["result"], soaked["memory"], soaked["still_answering"]
    counters_start, counters_end = soaked["counters_start"], soaked["counters_end"]
    statuses = result["statuses"]
    failures_5xx = sum(n for status, n in statuses.items() if status.startswith("5"))
    in_flight = sum(n for status, n in statuses.items() if status.startswith("in_flight"))
    connection_errors = sum(
        n
        for status, n in statuses.items()
        if not status.isdigit() and not status.startswith("in_flight")
    )
    in_flight_allowance = in_flight
    counted_errors = {
        code: counters_end["errors"].get(code, 0) - counters_start["errors"].get(code, 0)
        for _, code in BAD_INPUTS.values()
    }
    bad_sent = {code: result["sent"].get(kind, 0) for kind, (_, code) in BAD_INPUTS.items()}
    counter_gaps = {code: bad_sent[code] - counted_errors[code] for code in bad_sent}
    growth = (memory["end_of_same_processes_mib"] - memory["after_kill_mib"]) / max(
        memory["after_kill_mib"], 1
    )
    report = {
        "duration_seconds": args.duration,
        "concurrency": args.concurrency,
        "requests_sent": sum(result["sent"].values()),
        "sent_by_kind": result["sent"],
        "answered_by_status": {k: v for k, v in statuses.items() if k.isdigit()},
        "server_errors_5xx": failures_5xx,
        "dropped_connections": {k: v for k, v in statuses.items() if not k.isdigit()},
        "in_flight_on_killed_worker": in_flight,
        "connection_errors_otherwise": connection_errors,
        "killed_worker": result["killed_worker"],
        "good_answers_wrong_label": len(result["wrong_labels"]),
        "unexpected_answers": result["unexpected"][:10],
        "memory_mib": memory,
        "memory_growth_after_warm_up": round(growth, 4),
        "error_counters_vs_bad_inputs_sent": {"sent": bad_sent, "counted": counted_errors},
        "still_answering_after_run": still_answering,
    }
    checks = {
        "no 5xx, and no dropped connection but requests in flight on the killed worker": (
            failures_5xx == 0 and connection_errors == 0
        ),
        "every good answer has the offline onnxruntime label": not result["wrong_labels"],
        "every bad input got its status and error code": not [
            item for item in result["unexpected"] if item["kind"] != "good"
        ],
        "memory growth under 10%": growth < 0.10,
        "error counters equal the bad inputs sent": all(
            0 <= gap <= in_flight_allowance for gap in counter_gaps.values()
        )
        and sum(counter_gaps.values()) <= in_flight_allowance,
        "the service answers after the run": still_answering,
    }
    killed_info = result["killed_worker"]
    killed_info.pop("monotonic", None)
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model.resolve()
    images, expected = sample_images(model)
    report = judge(soak_a_server(model, images, expected, args), args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("SOAK PASSED" if report["passed"] else "SOAK FAILED", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
