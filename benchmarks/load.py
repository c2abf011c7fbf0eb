"""A bounded HTTP load generator, run as its own process: requests to ``/classify`` (one image)
or ``/classify_batch`` (``--batch`` images) at a fixed concurrency, stopping after ``--requests``
or ``--seconds``. Prints one JSON line per concurrency: images/s, latency percentiles, statuses.

    python -m benchmarks.load --url http://127.0.0.1:3000 --image cat.png --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np


async def run_load(
    url: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    seconds: float,
    endpoint: str = "/classify",
    batch: int = 1,
) -> dict:
    """Send up to ``requests`` requests with ``concurrency`` in flight, for at most ``seconds``."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        deadline = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal remaining
            sent = offset
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                if batch == 1:
                    files = {"image": ("image.png", images[sent % len(images)])}
                else:
                    files = [
                        ("images", (f"{i}.png", images[(sent + i) % len(images)]))
                        for i in range(batch)
                    ]
                sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post(endpoint, files=files)
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(index) for index in range(concurrency)))
        elapsed = time.perf_counter() - started
    milliseconds = np.asarray(latencies or [0.0]) * 1000
    return {
        "endpoint": endpoint,
        "concurrency": concurrency,
        "images_per_request": batch,
        "requests": len(latencies),
        "images_per_second": round(len(latencies) * batch / elapsed, 1),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
        "p95_ms": round(float(np.percentile(milliseconds, 95)), 2),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--image", type=Path, nargs="+", required=True)
    parser.add_argument("--endpoint", default="/classify")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency")
    parser.add_argument("--seconds", type=float, default=60, help="time bound per concurrency")
    parser.add_argument("--warmup", type=int, default=50, help="requests before each measurement")
    args = parser.parse_args()
    images = [path.read_bytes() for path in args.image]
    for concurrency in args.concurrency:
        common = dict(endpoint=args.endpoint, batch=args.batch)
        asyncio.run(run_load(args.url, images, concurrency, args.warmup, args.seconds, **common))
        result = asyncio.run(
            run_load(args.url, images, concurrency, args.requests, args.seconds, **common)
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
