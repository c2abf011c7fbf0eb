"""The prediction log on real databases, PostgreSQL and the embedded SQLite alike: labels before
and after their predictions, each counted once however many processes claim at once, migrations
run once by processes that start together, retention and orphans, and a database that goes away
and comes back."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import sqlalchemy

from benchmarks.postgres import Postgres
from service.store.database import create_engine, database_url
from service.store.log import DatabaseUnavailable, PredictionLog
from service.store.schema import labels, predictions
from training.command_config import MonitorConfig
from training.quality.monitor import live_figures


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return database_url("", tmp_path)
    return database_url(request.getfixturevalue("postgres").new_database(), tmp_path)


def row(request_id: str, predicted: str = "cat", at: float | None = None, score: float = 0.9):
    return {
        "request_id": request_id,
        "at": time.time() if at is None else at,
        "endpoint": "classify",
        "model_name": "animals",
        "model_version": "1",
        "top_k": [{"label": predicted, "score": score}],
        "predicted": predicted,
        "verdict": predicted,
        "score": score,
        "ood_score": None,
        "input_digest": "0" * 32,
        "input_bytes": 100,
        "captured": False,
        "capture_reason": None,
        "latency_ms": 1.0,
    }


def count_rows(url, table) -> int:
    with create_engine(url).connect() as connection:
        return connection.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(table)
        ).scalar()


def test_a_label_joins_before_or_after_its_prediction_and_counts_once(url):
    claims = []
    log = PredictionLog(url, 3600, on_claimed=claims.extend)
    early = log.record_labels({"early": "dog"})
    assert (early.joined, early.pending, early.claims) == ([], ["early"], [])
    log.submit([row("early"), row("later")])
    assert log.flush()
    # The writer that landed the prediction claimed the waiting label.
    assert [(c.request_id, c.label, c.previous, c.predicted) for c in claims] == [
        ("early", "dog", None, "cat")
    ]
    later = log.record_labels({"later": "cat", "early": "dog"})  # "early" again: not again
    assert (later.joined, later.pending) == (["early", "later"], [])
    assert [(c.request_id, c.previous) for c in later.claims] == [("later", None)]
    replaced = log.record_labels({"later": "dog"})
    assert [(c.request_id, c.label, c.previous) for c in replaced.claims] == [
        ("later", "dog", "cat")
    ]
    assert log.sweep() == 0  # nothing is left to count
    assert count_rows(url, labels) == 2 and count_rows(url, predictions) == 2


def _claim_in_a_process(url: str, rounds: int) -> int:
    log = PredictionLog(sqlalchemy.make_url(url), 3600, start=False)
    return sum(log.sweep() for _ in range(rounds))


def test_processes_that_claim_at_once_count_each_label_once(url):
    log = PredictionLog(url, 3600, start=False)
    log.ensure_ready()
    ids = [f"r{i}" for i in range(3000)]
    log.record_labels(dict.fromkeys(ids[:1000], "cat"))
    log.record_labels(dict.fromkeys(ids[1000:2000], "cat"))
    log.record_labels(dict.fromkeys(ids[2000:], "cat"))
    # The predictions land without their writer claiming (as when it dies before the claim):
    # four processes then sweep for them at once.
    with create_engine(url).begin() as connection:
        connection.execute(predictions.insert(), [row(i) for i in ids])
    shown = url.render_as_string(hide_password=False)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        claimed = pool.starmap(_claim_in_a_process, [(shown, 3)] * 4)
    assert sum(claimed) == len(ids), claimed


def _migrate_in_a_process(url: str) -> None:
    PredictionLog(sqlalchemy.make_url(url), 3600, start=False).ensure_ready()


def test_processes_that_start_together_migrate_once(url):
    shown = url.render_as_string(hide_password=False)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_migrate_in_a_process, [shown] * 4)
    with create_engine(url).connect() as connection:
        versions = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
        assert [version for (version,) in versions] == ["0003"]  # the head


def test_old_rows_are_pruned_and_a_label_that_never_joins_is_orphaned(url):
    orphaned = []
    log = PredictionLog(url, 2, on_orphaned=orphaned.append, start=False)
    log.ensure_ready()
    with create_engine(url).begin() as connection:
        connection.execute(predictions.insert(), [row("old", at=time.time() - 10), row("new")])
    log.record_labels({"never": "cat", "new": "dog"})
    log.prune()
    assert count_rows(url, predictions) == 1 and orphaned == []
    report = MonitorConfig(database=url.render_as_string(hide_password=False), since="1h")
    assert (live_figures(report)["pending"], live_figures(report)["orphaned"]) == (1, 0)
    time.sleep(2.5)
    log.prune()
    assert orphaned == [1]  # "never" waited out the retention; "new" had joined
    assert (live_figures(report)["pending"], live_figures(report)["orphaned"]) == (0, 1)
    log.prune()
    assert orphaned == [1]  # counted once
    with create_engine(url).connect() as connection:
        state = dict(
            connection.execute(sqlalchemy.select(labels.c.request_id, labels.c.orphaned_at)).all()
        )
    assert state["never"] is not None


def test_without_a_database_predictions_wait_and_overflow_is_counted(tmp_path):
    server = Postgres()
    try:
        url = database_url(server.new_database(), tmp_path)
        dropped, failures = [], []
        log = PredictionLog(
            url,
            3600,
            buffer_rows=50,
            on_dropped=dropped.append,
            on_failed=lambda: failures.append(1),
        )
        log.submit([row("before")])
        assert log.flush()
        server.stop()
        log.submit([row(f"down-{i}") for i in range(60)])
        assert sum(dropped) == 10  # the buffer holds 50
        with pytest.raises(DatabaseUnavailable):
            log.record_labels({"before": "cat"})
        time.sleep(1)
        assert failures and log.waiting == 50
        server.start()
        assert log.flush(30)
        assert count_rows(url, predictions) == 51
        assert log.record_labels({"before": "cat"}).joined == ["before"]
    finally:
        server.close()


# The capture store's bound in the test below: room for about 8 entries (each takes 12 KiB on
# disk, its folder, input and answer).
BOUND = 100_000


def _capture_in_a_process(url: str, folder: str, count: int, seed: int) -> int:
    import numpy as np

    from service.http.capture import CaptureStore, Entry
    from service.store.capture_ledger import CaptureLedger

    log = PredictionLog(sqlalchemy.make_url(url), 3600, start=False)
    evicted = []
    store = CaptureStore(
        folder,
        BOUND,
        on_written=lambda reason: None,
        on_evicted=evicted.append,
        on_dropped=lambda: None,
        ledger=CaptureLedger(log, folder, BOUND),
    )
    rng = np.random.default_rng(seed)
    for position in range(count):
        data = b"\x89PNG" + rng.bytes(int(rng.integers(500, 1500)))
        store.submit(Entry(f"p{seed}-{position}", {"label": "cat"}, data=data), "sample")
        time.sleep(0.005)
    store.flush(60)
    return len(evicted)


def test_writers_of_several_replicas_keep_one_capture_store_within_its_bound(url, tmp_path):
    from service.http.capture import entry_size
    from service.store.schema import capture_entries

    PredictionLog(url, 3600, start=False).ensure_ready()
    folder = str(tmp_path / "captured")
    shown = url.render_as_string(hide_password=False)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        evicted = pool.starmap(
            _capture_in_a_process, [(shown, folder, 40, seed) for seed in range(4)]
        )
    names = [path.name for path in (tmp_path / "captured").iterdir() if entry_size(path.name)]
    on_disk = sum(entry_size(name) for name in names)
    # Every entry was admitted through the ledger: the store is within its bound, and what
    # the writers evicted is what they wrote beyond it, each entry once.
    assert on_disk <= BOUND
    assert sum(evicted) == 160 - len(names) and sum(evicted) > 0
    with create_engine(url).connect() as connection:
        ledger = dict(
            connection.execute(
                sqlalchemy.select(capture_entries.c.name, capture_entries.c.bytes)
            ).all()
        )
    assert ledger == {name: entry_size(name) for name in names}
