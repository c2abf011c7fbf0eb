"""A bounded HTTP load generator: N requests to /classify at a fixed concurrency, from its own
process, reporting throughput and latency percentiles.

    python -m benchmarks.load --url http://127.0.0.1:3000 --image cat.png --concurrency 8
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
    url: str, image: bytes, concurrency: int, requests: int, timeout_s: float = 120
) -> dict:
    """Send ``requests`` POSTs to ``url/classify`` with ``concurrency`` in flight; stop early at
    ``timeout_s``. Returns images/s and latency percentiles in ms, and the status counts."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + timeout_s

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                started = time.perf_counter()
                try:
                    response = await client.post("/classify", files={"image": ("i.png", image)})
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    milliseconds = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "images_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
        "p95_ms": round(float(np.percentile(milliseconds, 95)), 2),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    image = args.image.read_bytes()
    for concurrency in args.concurrency:
        asyncio.run(run_load(args.url, image, concurrency, min(200, args.requests)))  # warm-up
        print(json.dumps(asyncio.run(run_load(args.url, image, concurrency, args.requests))))


if __name__ == "__main__":
    main()
