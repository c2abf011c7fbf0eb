"""The pod's record of recent predictions, which feedback is joined to: one SQLite file in WAL
mode that every worker process of the pod writes and reads (SQLite's own file locking makes it
safe across processes), bounded by age and by count.

Each row is one answered image: its request id, when, the model version, the top class, the
verdict (the top class or ``unknown``), the calibrated top-1 score, whether it was captured, and
the feedback label once one arrives (the last one wins).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DATABASE = "predictions.sqlite3"
# Pruning runs after this many inserts by one process: often enough to keep the file small,
# rarely enough to cost nothing per request.
PRUNE_EVERY = 1000
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    version TEXT NOT NULL,
    predicted TEXT NOT NULL,
    verdict TEXT NOT NULL,
    score REAL NOT NULL,
    captured INTEGER NOT NULL,
    feedback TEXT
)
"""


@dataclass(frozen=True)
class Prediction:
    """One answered image, as recorded."""

    request_id: str
    at: float  # seconds since the epoch
    version: str
    predicted: str  # the top class
    verdict: str  # the top class, or "unknown" when the detector flagged the input
    score: float  # calibrated top-1 probability
    captured: bool
    feedback: str | None = None


class UnknownRequestIds(LookupError):
    """Ids that name no recent prediction (never answered here, or forgotten)."""

    def __init__(self, ids: list[str]):
        super().__init__(", ".join(ids))
        self.ids = ids


class PredictionRecords:
    """The record, opened lazily in each process (a SQLite connection must not cross a fork)."""

    def __init__(self, folder: Path, retention_seconds: float, max_records: int) -> None:
        self.path = Path(folder) / DATABASE
        self.retention_seconds = retention_seconds
        self.max_records = max_records
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from the event loop and threads
        self._inserts = 0

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            # A record lost in a power cut costs one 404 on feedback, not a corrupt file (WAL).
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(SCHEMA)
            connection.commit()
            self._connection = connection
        return self._connection

    def add(self, predictions: list[Prediction]) -> None:
        """Record answered images; an id answered again is recorded anew."""
        rows = [
            (p.request_id, p.at, p.version, p.predicted, p.verdict, p.score, int(p.captured))
            for p in predictions
        ]
        with self._lock:
            connection = self._connect()
            connection.executemany(
                "INSERT OR REPLACE INTO predictions "
                "(id, at, version, predicted, verdict, score, captured) VALUES (?,?,?,?,?,?,?)",
                rows,
            )
            connection.commit()
            self._inserts += len(rows)
            if self._inserts >= PRUNE_EVERY:
                self._inserts = 0
                self._prune(connection)

    def _prune(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            "DELETE FROM predictions WHERE at < ?", (time.time() - self.retention_seconds,)
        )
        connection.execute(
            "DELETE FROM predictions WHERE rowid <= (SELECT MAX(rowid) FROM predictions) - ?",
            (self.max_records,),
        )
        connection.commit()

    def set_feedback(self, labels: dict[str, str]) -> list[tuple[Prediction, str]]:
        """Attach a label to each request id, all or none.

        Returns:
            Each prediction as it was before (with its earlier feedback, if any) and its new label.

        Raises:
            UnknownRequestIds: some ids name no recent prediction; nothing was changed.
        """
        oldest = time.time() - self.retention_seconds
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")  # no other process changes them meanwhile
            try:
                found = {}
                for request_id in labels:
                    row = connection.execute(
                        "SELECT id, at, version, predicted, verdict, score, captured, feedback "
                        "FROM predictions WHERE id = ? AND at >= ?",
                        (request_id, oldest),
                    ).fetchone()
                    if row is not None:
                        found[request_id] = Prediction(*row[:6], bool(row[6]), row[7])
                missing = [request_id for request_id in labels if request_id not in found]
                if missing:
                    raise UnknownRequestIds(missing)
                connection.executemany(
                    "UPDATE predictions SET feedback = ? WHERE id = ?",
                    [(label, request_id) for request_id, label in labels.items()],
                )
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
        return [(found[request_id], label) for request_id, label in labels.items()]

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
