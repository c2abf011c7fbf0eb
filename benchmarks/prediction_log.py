"""The prediction log's cost: ``/classify`` multipart at 8 connections with the log on PostgreSQL
against the log off, in interleaved rounds (off, on, off, on, ...), each on a fresh server and,
for the log, a fresh database; and the rows per second one writer sustains at several batch sizes.

    python -m benchmarks.prediction_log --model artifacts/animals/latest --rounds 3
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import payload_bodies
from benchmarks.postgres import Postgres
from benchmarks.servers import over_rounds, parse_rounds_args, server
from benchmarks.wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
WRITER_ROWS = 20_000
BATCH_CHOICES = (100, 500, 2000)


def log_row(request_id: str) -> dict:
    return {
        "request_id": request_id,
        "at": time.time(),
        "endpoint": "classify",
        "model_name": "animals",
        "model_version": "1",
        "top_k": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.05}],
        "predicted": "cat",
        "verdict": "cat",
        "score": 0.9,
        "ood_score": 0.5,
        "input_digest": "0" * 32,
        "input_bytes": 1000,
        "captured": False,
        "capture_reason": None,
        "latency_ms": 1.0,
    }


def writer_rows_per_second(database: Postgres, batch_rows: int) -> float:
    """Rows per second one writer thread lands, from a full buffer, at ``batch_rows`` a batch."""
    from service.store import log
    from service.store.database import database_url

    writer = log.PredictionLog(
        database_url(database.new_database(), Path(".")),
        3600,
        buffer_rows=WRITER_ROWS,
        batch_rows=batch_rows,
    )
    writer.ensure_ready()
    writer.submit([log_row("warm-up")])
    writer.flush()
    rows = [log_row(f"r{i}") for i in range(WRITER_ROWS)]
    started = time.perf_counter()
    writer.submit(rows)
    assert writer.flush(120), "the writer did not catch up"
    seconds = time.perf_counter() - started
    writer.close()
    return round(WRITER_ROWS / seconds, 1)


def measure_prediction_log(
    model_folder: Path, payloads: dict[str, bytes], seconds: float, rounds: int
) -> dict:
    """``{"classify": {setting: {payload: figures}}, "writer": {batch: rows/s}}``."""
    database = Postgres()
    try:
        runs: dict[str, dict[str, list[dict]]] = {"off": {}, "log_postgres": {}}
        bodies = {
            name: body for name, body in payload_bodies(payloads).items() if "multipart" in name
        }
        for _ in range(rounds):
            for setting in runs:
                with tempfile.TemporaryDirectory() as scratch:
                    environment = {"FEEDBACK_DIR": scratch}
                    if setting == "log_postgres":
                        environment |= {
                            "FEEDBACK_TOKEN": "bench",
                            "DATABASE_URL": database.new_database(),
                        }
                    with server("service.service:ImageClassifier", model_folder, **environment) as (
                        url,
                        _,
                        pid,
                    ):
                        for payload, (body, content_type) in bodies.items():
                            result = run_wrk(f"{url}/classify", body, content_type, 8, seconds, pid)
                            runs[setting].setdefault(payload, []).append(result)
        classify = {
            setting: {payload: over_rounds(results) for payload, results in by_payload.items()}
            for setting, by_payload in runs.items()
        }
        writer = {str(batch): writer_rows_per_second(database, batch) for batch in BATCH_CHOICES}
    finally:
        database.close()
    ratios = {}
    for payload in bodies:
        on, off = classify["log_postgres"][payload], classify["off"][payload]
        key = payload.split()[0]
        ratios[f"log_postgres_p50_vs_off_{key}_c8"] = round(on["p50_ms"] / off["p50_ms"], 3)
        ratios[f"log_postgres_rps_vs_off_{key}_c8"] = round(
            on["images_per_second"] / off["images_per_second"], 3
        )
    return {"classify": classify, "writer_rows_per_second": writer, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    args = parse_rounds_args(__doc__, argv)
    if args is None:
        return 2
    from benchmarks.run import PHOTO

    png = args.png.read_bytes()
    figures = measure_prediction_log(
        args.model.resolve(), {"png": png, "jpeg": PHOTO.read_bytes()}, args.seconds, args.rounds
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
