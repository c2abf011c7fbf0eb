"""The prediction log's writer and the labels joined to it, for one worker process.

- **Off the request path.** A request appends its rows to a bounded buffer and returns; a thread
  writes them in batches (one multi-row upsert per batch), every ``FLUSH_SECONDS`` or as soon as
  ``BATCH_ROWS`` wait. When the database is down the rows wait and the writes are retried with
  a growing pause; rows that find the buffer full are dropped and counted. A prediction never
  fails because of the log.
- **Labels from any replica, whenever they arrive.** :meth:`PredictionLog.record_labels` stores
  every label of a request in one committed transaction (so a 2xx answer means it is on disk),
  whether or not its prediction has landed: ``joined`` when it has, else ``pending``.
- **Counted once across replicas.** A label is counted by the one process that *claims* it: the
  feedback request when the prediction is there, else the writer that lands the prediction, else
  the sweep every process runs every ``SWEEP_SECONDS`` (which also catches the two racing). A
  claim selects the uncounted pairs ``FOR UPDATE SKIP LOCKED`` (on SQLite, transactions take the
  write lock at BEGIN, which serialises claims the same way) and sets ``counted_label`` in the
  same transaction; the caller counts the claims after the commit.
- **Retention.** Rows older than the retention are deleted in bounded batches; a label still
  waiting for its prediction then is marked orphaned (and counted), and kept one retention more
  for the reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import OperationalError

from service.store.database import create_engine, is_unavailable, migrate, shown
from service.store.retention import PRUNE_STEPS, STEP_ROWS, prune
from service.store.rows import (
    copy_upsert,
    dialect_insert,
    shadow_insert_statement,
    upsert_statement,
)
from service.store.schema import UNCOUNTED, labels, predictions

log = logging.getLogger(__name__)


# Chosen from `python -m benchmarks log-writer` (BENCHMARKS.md): rows per upsert, and how long
# a row waits at most before its batch is written.
BATCH_ROWS = 2000
FLUSH_SECONDS = 1.0
# Rows waiting for the database, at most; past this, new rows are dropped (and counted).
BUFFER_ROWS = 10_000
# How often each process looks for labels whose prediction landed since (races, restarts).
SWEEP_SECONDS = 2.0
# The longest pause between two retries while the database is down.
MAX_RETRY_SECONDS = 5.0
# After a failed connection, feedback answers "unavailable" at once for this long.
DOWN_SECONDS = 1.0


class DatabaseUnavailable(RuntimeError):
    """The prediction log's database cannot be reached."""


@dataclass(frozen=True)
class Claim:
    """A label this process counts: its prediction, the label counted before (None if none)
    and the label to count now."""

    request_id: str
    label: str
    previous: str | None
    predicted: str
    score: float
    captured: bool


@dataclass(frozen=True)
class Recorded:
    """What :meth:`PredictionLog.record_labels` stored."""

    joined: list[str]  # ids whose prediction is in the log
    pending: list[str]  # ids whose prediction has not landed (yet)
    claims: list[Claim]  # the labels this request counts


class PredictionLog:
    """One process's connection to the prediction log (opened lazily: an engine must not cross
    a fork), its writer thread and its share of the sweeps.

    Args:
        on_claimed: ``(claims)`` after a commit that claimed labels, in whichever thread.
        on_written / on_dropped / on_orphaned: ``(rows)`` after rows were written, dropped from
            a full buffer, or labels were orphaned.
        on_failed: ``()`` after a write that the database refused or could not take.
        maintain: also take this process's share of the sweeps and the retention's prunes
            (a writer that counts no claims, such as the shadow's, leaves them to the workers).
    """

    def __init__(
        self,
        url: URL,
        retention_seconds: float,
        buffer_rows: int = BUFFER_ROWS,
        batch_rows: int = BATCH_ROWS,
        on_claimed: Callable[[list[Claim]], None] = lambda claims: None,
        on_written: Callable[[int], None] = lambda rows: None,
        on_dropped: Callable[[int], None] = lambda rows: None,
        on_orphaned: Callable[[int], None] = lambda rows: None,
        on_failed: Callable[[], None] = lambda: None,
        start: bool = True,
        maintain: bool = True,
    ) -> None:
        self.url = url
        self.retention_seconds = retention_seconds
        self.buffer_rows = buffer_rows
        self.batch_rows = batch_rows
        self.on_claimed, self.on_written, self.on_dropped = on_claimed, on_written, on_dropped
        self.on_orphaned, self.on_failed = on_orphaned, on_failed
        self.maintain = maintain
        # A pass every tenth of the retention (a short retention in a test is pruned quickly).
        self.prune_seconds = min(60.0, max(0.5, retention_seconds / 10))
        self._engine = None
        self._ready = False
        self._down_at = -DOWN_SECONDS
        self._lock = threading.Lock()  # one engine
        self._migrating = threading.Lock()  # one migration
        self._buffer: deque[dict] = deque()
        self._shadow: deque[dict] = deque()  # a challenger's rows (SHADOW_MODEL)
        self._wake = threading.Event()
        self._stopping = False
        self._writing = 0  # rows taken from the buffer and not yet committed
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    @property
    def engine(self):
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = create_engine(self.url)
        return self._engine

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # The request side.

    def submit(self, rows: list[dict]) -> None:
        """Hand rows to the writer; never blocks and never raises."""
        room = self.buffer_rows - len(self._buffer)
        if room < len(rows):
            self.on_dropped(len(rows) - max(room, 0))
            rows = rows[: max(room, 0)]
        self._buffer.extend(rows)
        if len(self._buffer) >= self.batch_rows:
            self._wake.set()

    def submit_shadow(self, rows: list[dict]) -> None:
        """Hand a challenger's rows to the writer (:data:`~service.store.schema.
        shadow_predictions`), within the same bound; never blocks and never raises."""
        room = self.buffer_rows - len(self._shadow)
        if room < len(rows):
            self.on_dropped(len(rows) - max(room, 0))
            rows = rows[: max(room, 0)]
        self._shadow.extend(rows)

    @property
    def waiting(self) -> int:
        """Rows handed over and not yet written."""
        return len(self._buffer) + len(self._shadow) + self._writing

    def record_labels(self, sent: dict[str, str], known: set[str] | None = None) -> Recorded:
        """Store each ``{request_id: label}``, all or none, and claim those that join;
        ``known`` is the served model's classes (a label outside them may be a new class).

        Raises:
            DatabaseUnavailable: the database cannot be reached; nothing was stored.
        """
        self.ensure_ready()
        ids = sorted(sent)  # one lock order for every request: no deadlock between two
        now = time.time()
        rows = [
            {
                "request_id": i,
                "label": sent[i],
                "new_class": known is not None and sent[i] not in known,
                "first_received_at": now,
                "received_at": now,
            }
            for i in ids
        ]
        statement = dialect_insert(self.dialect)(labels)
        statement = statement.on_conflict_do_update(
            index_elements=[labels.c.request_id],
            set_={
                "label": statement.excluded.label,
                "new_class": statement.excluded.new_class,
                "received_at": statement.excluded.received_at,
                "orphaned_at": None,
            },
        )
        for attempt in range(3):
            try:
                with self.engine.begin() as connection:
                    connection.execute(statement, rows)
                    claims = self._claim(connection, ids)
                    present = set(
                        connection.execute(
                            select(predictions.c.request_id).where(
                                predictions.c.request_id.in_(ids)
                            )
                        ).scalars()
                    )
                break
            except Exception as error:
                if isinstance(error, OperationalError) and "deadlock" in str(error) and attempt < 2:
                    continue  # PostgreSQL chose this transaction to break a deadlock: again
                if not is_unavailable(error):
                    raise
                self._down_at = time.monotonic()
                raise DatabaseUnavailable(f"{shown(self.url)}: {error}") from error
        if claims:
            self.on_claimed(claims)
        joined = [i for i in ids if i in present]
        return Recorded(joined, [i for i in ids if i not in present], claims)

    def ensure_ready(self) -> None:
        """Connect and migrate once; raise :class:`DatabaseUnavailable` while it is down."""
        if self._ready:
            return
        if time.monotonic() - self._down_at < DOWN_SECONDS:
            raise DatabaseUnavailable(f"{shown(self.url)} did not answer a moment ago")
        with self._migrating:
            if self._ready:
                return
            try:
                migrate(self.engine)
            except Exception as error:
                if not is_unavailable(error):
                    raise
                self._down_at = time.monotonic()
                raise DatabaseUnavailable(f"{shown(self.url)}: {error}") from error
            self._ready = True

    # The writer thread.

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row handed over so far is written; whether it was."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.waiting

    def close(self, timeout: float = 5.0) -> None:
        """Write what waits (within ``timeout``) and stop the writer."""
        self.flush(timeout)
        self._stopping = True
        self._wake.set()

    def _run(self) -> None:
        pause = FLUSH_SECONDS
        swept_at = pruned_at = 0.0
        failing = False
        while not self._stopping:
            self._wake.wait(pause)
            self._wake.clear()
            try:
                self.ensure_ready()
                while self._buffer:
                    self._write_batch()
                while self._shadow:
                    self._write_shadow_batch()
                now = time.monotonic()
                if self.maintain and now - swept_at >= SWEEP_SECONDS:
                    self.sweep()
                    swept_at = now
                if self.maintain and now - pruned_at >= self.prune_seconds:
                    self.prune()
                    pruned_at = now
                if failing:
                    log.warning("prediction log: %s answers again", shown(self.url))
                failing, pause = False, FLUSH_SECONDS
            except Exception as error:  # serving goes on whatever the database does
                self.on_failed()
                if not failing:
                    log.warning(
                        "prediction log: writes to %s fail, retrying: %s", shown(self.url), error
                    )
                failing = True
                pause = min(MAX_RETRY_SECONDS, pause * 2)

    def _write_batch(self) -> None:
        batch: dict[str, dict] = {}
        while self._buffer and len(batch) < self.batch_rows:
            row = self._buffer.popleft()
            batch[row["request_id"]] = row  # an id answered again: its last answer
            self._writing += 1
        taken = self._writing
        try:
            with self.engine.begin() as connection:
                self._no_wait_for_disk(connection)
                if self.dialect == "postgresql":
                    copy_upsert(connection, list(batch.values()))
                else:
                    connection.execute(upsert_statement(self.dialect), list(batch.values()))
                claims = self._claim(connection, list(batch))
        except BaseException:
            self._buffer.extendleft(reversed(list(batch.values())))  # retried, in order
            self._writing = 0
            raise
        self._writing = 0
        self.on_written(taken)
        if claims:
            self.on_claimed(claims)

    def _write_shadow_batch(self) -> None:
        batch = [self._shadow.popleft() for _ in range(min(self.batch_rows, len(self._shadow)))]
        try:
            with self.engine.begin() as connection:
                self._no_wait_for_disk(connection)
                connection.execute(shadow_insert_statement(self.dialect), batch)
        except BaseException:
            self._shadow.extendleft(reversed(batch))  # retried, in order
            raise
        self.on_written(len(batch))

    def _no_wait_for_disk(self, connection: Connection) -> None:
        """On PostgreSQL, commit this transaction without waiting for its WAL to reach the disk:
        no one was promised these rows (a crash of the database loses the last fraction of a
        second of them, never a label, whose transactions keep the synchronous commit)."""
        if self.dialect == "postgresql":
            connection.exec_driver_sql("SET LOCAL synchronous_commit = off")

    def _claim(self, connection: Connection, ids: list[str] | None = None) -> list[Claim]:
        """Claim the uncounted labels whose prediction is in the log (of ``ids``, or any), and
        mark them counted in this transaction."""
        query = (
            select(
                labels.c.request_id,
                labels.c.label,
                labels.c.counted_label,
                predictions.c.predicted,
                predictions.c.score,
                predictions.c.captured,
            )
            .join(predictions, predictions.c.request_id == labels.c.request_id)
            .where(UNCOUNTED)
            .with_for_update(of=labels, skip_locked=True)
        )
        query = (
            query.where(labels.c.request_id.in_(ids)) if ids is not None else query.limit(STEP_ROWS)
        )
        claims = [Claim(*row[:5], bool(row[5])) for row in connection.execute(query)]
        if claims:
            connection.execute(
                update(labels)
                .where(labels.c.request_id == bindparam("claimed_id"))
                .values(counted_label=bindparam("claimed_label")),
                [{"claimed_id": c.request_id, "claimed_label": c.label} for c in claims],
            )
        return claims

    def sweep(self) -> int:
        """Claim the labels whose prediction landed without its writer seeing them (the two
        committed at once, or the writer died first); the labels claimed."""
        claimed = 0
        for _ in range(PRUNE_STEPS):
            with self.engine.begin() as connection:
                self._no_wait_for_disk(connection)
                claims = self._claim(connection)
            if claims:
                self.on_claimed(claims)
            claimed += len(claims)
            if len(claims) < STEP_ROWS:
                break
        return claimed

    def prune(self) -> None:
        """Delete what the retention has passed, in bounded batches, and orphan the labels
        whose prediction never came (:func:`service.store.retention.prune`)."""
        prune(self.engine, self.retention_seconds, self.on_orphaned)
