"""Several real ``bentoml serve`` replicas sharing one real PostgreSQL, as pods behind a plain
Service: haproxy's round-robin stands in front, each replica has its own record folder, and all
share the capture folder. Labels go through another replica than the one that answered; the
counters summed over the replicas count each label once; a replica killed with SIGKILL loses no
acknowledged label; and a database that stops mid-run costs no prediction."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import sqlalchemy

from benchmarks.postgres import Postgres
from benchmarks.servers import free_port, scrape, total
from benchmarks.servers import server as serve_on_free_port
from service.store.database import create_engine, database_url
from service.store.log import SWEEP_SECONDS
from service.store.schema import labels, predictions
from tests.helpers import encode_image, run_training_cli

pytestmark = [pytest.mark.slow]
TOKEN = "replica-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUFFER_ROWS = 40  # small, so that a stopped database overflows it within the test


@pytest.fixture(scope="module")
def animals():
    from training.data.sources import load_animals

    images = load_animals()
    chosen = np.random.default_rng(5).choice(len(images.names), 80, replace=False)
    return [(encode_image(images.pixels[i], "PNG"), str(images.names[i])) for i in chosen]


HAPROXY = """
global
    maxconn 512
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend service
    bind 127.0.0.1:{port}
    default_backend pods
backend pods
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def round_robin(urls: list[str], folder):
    """haproxy on a free port, spreading requests over ``urls`` in turn; yields its URL."""
    port = free_port()
    servers = "\n".join(
        f"    server pod{i} {url.removeprefix('http://')}" for i, url in enumerate(urls)
    )
    config = folder / "haproxy.cfg"
    config.write_text(HAPROXY.format(port=port, servers=servers))
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def replica(tiny_run, database: str, folder, name: str):
    """One pod: one worker, its own record folder and BentoML home (whose metrics folder each pod
    has to itself), the shared database and capture folder."""
    return serve_on_free_port(
        "service.service:ImageClassifier",
        tiny_run["folder"],
        WORKERS="1",
        FEEDBACK_TOKEN=TOKEN,
        DATABASE_URL=database,
        FEEDBACK_DIR=str(folder / f"records-{name}"),
        BENTOML_HOME=str(folder / f"bentoml-{name}"),
        CAPTURE="unknown",
        CAPTURE_DIR=str(folder / "captured"),
        PREDICTION_LOG_BUFFER=str(BUFFER_ROWS),
    )


@pytest.fixture(scope="module")
def cluster(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    database = Postgres()
    url = database.new_database()
    try:
        with (
            replica(tiny_run, url, folder, "a") as (a, _, _),
            replica(tiny_run, url, folder, "b") as (b, _, _),
            round_robin([a, b], folder) as service,
        ):
            yield {
                "database": database,
                "url": url,
                "replicas": [a, b],
                "service": service,
                "folder": folder,
            }
    finally:
        database.close()


def classify(url: str, data: bytes, **headers: str) -> dict:
    response = httpx.post(f"{url}/classify", files={"image": ("a.png", data)}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def label(url: str, items) -> httpx.Response:
    return httpx.post(f"{url}/feedback", json=items, headers=AUTH, timeout=30)


def summed(urls: list[str], name: str, **labels_: str) -> float:
    return sum(total(scrape(url), name, **labels_) for url in urls)


def wait_until(condition, seconds: float = 30.0, shown=lambda: None) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {shown()}"
        time.sleep(0.1)


def rows(url: str, query):
    with create_engine(database_url(url, None)).connect() as connection:
        return connection.execute(query).all()


def test_labels_through_another_replica_join_and_the_summed_counters_are_exact(cluster, animals):
    a, b = cluster["replicas"]
    service = cluster["service"]
    before = {
        key: summed([a, b], "classifier_feedback_total", correct=key) for key in ("true", "false")
    }
    requests_before = [
        total(scrape(url), "classifier_requests_total", endpoint="classify") for url in (a, b)
    ]
    answered = []  # (answer, truth, the replica to send its label through)
    for position, (data, truth) in enumerate(animals[:20]):
        answered.append((classify(a if position % 2 else b, data), truth, b if position % 2 else a))
    for data, truth in animals[20:40]:
        answered.append((classify(service, data), truth, service))
    # Both pods answered through the Service: plain round-robin, no sticky routing.
    requests_after = [
        total(scrape(url), "classifier_requests_total", endpoint="classify") for url in (a, b)
    ]
    assert all(
        after - start >= 15 for start, after in zip(requests_before, requests_after, strict=True)
    )
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda item: label(
                    item[2], {"request_id": item[0]["request_id"], "label": item[1]}
                ),
                answered,
            )
        )
    assert all(response.status_code in (200, 202) for response in responses), [
        r.text for r in responses
    ]
    right = sum(answer["top_k"][0]["label"] == truth for answer, truth, _ in answered)
    expected = {"true": before["true"] + right, "false": before["false"] + len(answered) - right}

    def counted():
        return {key: summed([a, b], "classifier_feedback_total", correct=key) for key in expected}

    wait_until(lambda: counted() == expected, shown=lambda: (counted(), expected))
    time.sleep(SWEEP_SECONDS + 0.5)  # every replica has swept again: still counted once
    for key, value in expected.items():
        assert summed([a, b], "classifier_feedback_total", correct=key) == value
    ids = [answer["request_id"] for answer, _, _ in answered]
    joined = rows(
        cluster["url"],
        sqlalchemy.select(labels.c.request_id).where(
            labels.c.request_id.in_(ids), labels.c.counted_label == labels.c.label
        ),
    )
    assert len(joined) == len(ids)


def test_a_label_sent_before_its_prediction_is_written_waits_and_then_joins_once(cluster, animals):
    a, b = cluster["replicas"]
    before = summed([a, b], "classifier_feedback_predictions_total")
    # A answers; B takes the label at once, before A's writer (every FLUSH_SECONDS) has written
    # the prediction. Should A's writer have flushed in between, the next image tries again.
    for position in range(50, 55):
        answer = classify(a, animals[position][0])
        response = label(b, {"request_id": answer["request_id"], "label": animals[position][1]})
        if response.status_code == 202:
            break
    assert response.status_code == 202, response.text
    assert response.json()["pending_ids"] == [answer["request_id"]]
    wait_until(lambda: summed([a, b], "classifier_feedback_predictions_total") == before + 1)
    time.sleep(SWEEP_SECONDS + 0.5)
    assert summed([a, b], "classifier_feedback_predictions_total") == before + 1
    # Sent again now, it joins at once and is not counted again.
    again = label(a, {"request_id": answer["request_id"], "label": animals[position][1]})
    assert again.status_code == 200 and again.json()["joined"] == 1


def test_an_id_reused_by_another_client_cannot_take_over_a_label(cluster, animals):
    a, b = cluster["replicas"]
    victim = classify(a, animals[70][0], **{"X-Request-ID": "order-1042"})
    attacker = classify(b, animals[71][0], **{"X-Request-ID": "order-1042"})
    assert victim["request_id"] != attacker["request_id"]
    assert all(answer["request_id"].startswith("order-1042.") for answer in (victim, attacker))
    both = [victim["request_id"], attacker["request_id"]]
    query = sqlalchemy.select(predictions.c.request_id, predictions.c.input_digest).where(
        predictions.c.request_id.in_(both)
    )
    wait_until(lambda: len(rows(cluster["url"], query)) == 2)  # both replicas wrote theirs
    digests = dict(rows(cluster["url"], query))
    assert digests[victim["request_id"]] != digests[attacker["request_id"]]
    assert label(a, {"request_id": victim["request_id"], "label": "cat"}).status_code == 200
    assert label(b, {"request_id": "order-1042", "label": "cat"}).status_code == 202


def test_the_monitor_reports_what_the_log_holds(cluster, tmp_path):
    output = tmp_path / "figures.json"
    result = run_training_cli(
        "monitor", "--database", cluster["url"], "--since", "1h", "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    import json

    figures = json.loads(output.read_text())
    joined = rows(
        cluster["url"],
        sqlalchemy.select(predictions.c.predicted, labels.c.label).join(
            labels, labels.c.request_id == predictions.c.request_id
        ),
    )
    total_rows = rows(
        cluster["url"], sqlalchemy.select(sqlalchemy.func.count()).select_from(predictions)
    )[0][0]
    assert figures["labelled"] == len(joined) >= 41
    assert figures["predictions"] == total_rows
    assert figures["accuracy"] == pytest.approx(
        sum(p == t for p, t in joined) / len(joined), abs=1e-4
    )
    assert sum(map(sum, figures["confusion"])) == len(joined)
    assert "accuracy:" in result.stdout and "confusion" in result.stdout


def test_a_replica_killed_under_load_loses_no_acknowledged_label(cluster, tiny_run, animals):
    a, _ = cluster["replicas"]
    with replica(tiny_run, cluster["url"], cluster["folder"], "c") as (c, _, pid):
        made = [classify(c, data) for data, _ in animals[:10]]  # before the kill
        wait_until(
            lambda: (
                len(
                    rows(
                        cluster["url"],
                        sqlalchemy.select(predictions.c.request_id).where(
                            predictions.c.request_id.in_([m["request_id"] for m in made])
                        ),
                    )
                )
                == len(made)
            )
        )
        acknowledged = []

        def load(position: int):
            data, truth = animals[position % len(animals)]
            with contextlib.suppress(httpx.HTTPError):
                answer = classify(a, data)
                response = label(c, {"request_id": answer["request_id"], "label": truth})
                if response.status_code in (200, 202):
                    acknowledged.append(answer["request_id"])

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(load, position) for position in range(60)]
            wait_until(lambda: len(acknowledged) >= 10)
            os.killpg(pid, signal.SIGKILL)
            for future in futures:
                future.result()
    stored = {
        request_id
        for (request_id,) in rows(
            cluster["url"],
            sqlalchemy.select(labels.c.request_id).where(labels.c.request_id.in_(acknowledged)),
        )
    }
    assert set(acknowledged) <= stored and len(acknowledged) >= 10
    # Restarted, the pod takes the labels of what it answered before the kill: they join.
    with replica(tiny_run, cluster["url"], cluster["folder"], "c") as (c, _, _):
        items = [
            {"request_id": m["request_id"], "label": truth}
            for m, (_, truth) in zip(made, animals, strict=False)
        ]
        response = label(c, items)
        assert response.status_code == 200 and response.json()["joined"] == len(made), response.text


def test_a_stopped_database_costs_no_prediction_and_the_log_resumes(cluster, animals):
    a, b = cluster["replicas"]
    database = cluster["database"]
    dropped_before = summed([a, b], "classifier_prediction_log_dropped_total")
    written_before = summed([a, b], "classifier_prediction_log_written_total")
    database.stop()
    try:
        statuses = [
            httpx.post(f"{url}/classify", files={"image": ("a.png", data)}).status_code
            for url in (a, b)
            for data, _ in animals[:60]
        ]
        assert statuses == [200] * 120
        # Each replica's buffer holds BUFFER_ROWS; the rest was dropped, and counted.
        dropped = summed([a, b], "classifier_prediction_log_dropped_total") - dropped_before
        assert dropped == 2 * (60 - BUFFER_ROWS)
        response = label(a, {"request_id": "any-id", "label": "cat"})
        assert response.status_code == 503 and response.json()["error"] == "database_unavailable"
        assert httpx.get(f"{a}/readyz").status_code == 200  # still ready for predictions
    finally:
        database.start()
    # The buffered rows are written at the writers' next retry, and the log goes on.
    wait_until(
        lambda: (
            summed([a, b], "classifier_prediction_log_written_total")
            == written_before + 2 * BUFFER_ROWS
        ),
        seconds=60,
    )
    answer = classify(b, animals[60][0])
    wait_until(
        lambda: rows(
            cluster["url"],
            sqlalchemy.select(predictions.c.request_id).where(
                predictions.c.request_id == answer["request_id"]
            ),
        ),
        seconds=60,
    )
    response = label(a, {"request_id": answer["request_id"], "label": animals[60][1]})
    assert response.status_code == 200, response.text
