"""The capture store's bound across replicas: a ledger of its entries in the prediction log's
database. Each writer, after it renames an entry into place, adds it to the ledger and raises
the store's running total in one transaction that holds the total's row lock, so writers of all
replicas take turns; past the bound, the same transaction takes the oldest entries off the
ledger, and the writer deletes their folders. The store then exceeds its bound by at most the
entries written and not yet admitted: one per writer."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete, func, select, update

from service.store.log import PredictionLog
from service.store.rows import dialect_insert
from service.store.schema import capture_entries, capture_usage

# Oldest entries one admission looks at to make room, at most.
EVICT_STEP = 200


class CaptureLedger:
    """The ledger of the store ``store`` (its folder, as every pod mounts it)."""

    def __init__(self, log: PredictionLog, store: str, max_bytes: int) -> None:
        self.log = log
        self.store = store
        self.max_bytes = max_bytes

    def _lock_total(self, connection) -> int:
        connection.execute(
            dialect_insert(self.log.dialect)(capture_usage)
            .values(store=self.store, bytes=0)
            .on_conflict_do_nothing(index_elements=[capture_usage.c.store])
        )
        return connection.execute(
            select(capture_usage.c.bytes)
            .where(capture_usage.c.store == self.store)
            .with_for_update()
        ).scalar_one()

    def reconcile(self, listing: Callable[[], dict[str, int]]) -> None:
        """Make the ledger what the folder holds (``listing()``: ``{entry name: bytes}``, read
        while the lock is held, so that no other writer admits an entry meanwhile), as a writer
        starts: entries written before the ledger, or whose folders are gone."""
        self.log.ensure_ready()
        with self.log.engine.begin() as connection:
            self._lock_total(connection)
            on_disk = listing()
            known = dict(
                connection.execute(
                    select(capture_entries.c.name, capture_entries.c.bytes).where(
                        capture_entries.c.store == self.store
                    )
                ).all()
            )
            gone = [name for name in known if name not in on_disk]
            for start in range(0, len(gone), 1000):
                connection.execute(
                    delete(capture_entries).where(
                        capture_entries.c.store == self.store,
                        capture_entries.c.name.in_(gone[start : start + 1000]),
                    )
                )
            missing = [
                {"store": self.store, "name": name, "bytes": size}
                for name, size in on_disk.items()
                if name not in known
            ]
            if missing:
                connection.execute(capture_entries.insert(), missing)
            total = connection.execute(
                select(func.coalesce(func.sum(capture_entries.c.bytes), 0)).where(
                    capture_entries.c.store == self.store
                )
            ).scalar_one()
            connection.execute(
                update(capture_usage).where(capture_usage.c.store == self.store).values(bytes=total)
            )

    def admit(self, name: str, size: int) -> list[tuple[str, int]]:
        """Add an entry now in place; the oldest entries to delete to stay within the bound
        (already off the ledger: no other writer deletes them)."""
        self.log.ensure_ready()
        with self.log.engine.begin() as connection:
            total = self._lock_total(connection)
            added = connection.execute(
                dialect_insert(self.log.dialect)(capture_entries)
                .values(store=self.store, name=name, bytes=size)
                .on_conflict_do_nothing()
            )
            if added.rowcount:  # not already counted by a writer that started meanwhile
                total += size
            evicted: list[tuple[str, int]] = []
            while total > self.max_bytes:
                oldest = connection.execute(
                    select(capture_entries.c.name, capture_entries.c.bytes)
                    .where(capture_entries.c.store == self.store)
                    .order_by(capture_entries.c.name)
                    .limit(EVICT_STEP)
                ).all()
                if not oldest:
                    break
                chosen = []
                for entry, entry_size in oldest:
                    if total <= self.max_bytes:
                        break
                    chosen.append((entry, entry_size))
                    total -= entry_size
                connection.execute(
                    delete(capture_entries).where(
                        capture_entries.c.store == self.store,
                        capture_entries.c.name.in_([entry for entry, _ in chosen]),
                    )
                )
                evicted += chosen
            connection.execute(
                update(capture_usage).where(capture_usage.c.store == self.store).values(bytes=total)
            )
        return evicted
