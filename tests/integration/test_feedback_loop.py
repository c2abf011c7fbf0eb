"""The production loop, end to end on real servers with two workers and the embedded SQLite log:
request ids, feedback joined to the logged predictions (live accuracy and confusion in /metrics),
labels for ids never answered left pending and then orphaned, inputs captured for relabelling
within their bound, the captured store as training data, and a retrain that must beat the model
it replaces. Several replicas on PostgreSQL: tests/integration/test_replicas.py."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest

from benchmarks.servers import scrape, total
from benchmarks.servers import server as serve_on_free_port
from service.http.capture import RESCAN_SECONDS
from service.store.log import SWEEP_SECONDS
from tests.helpers import api_workers, bentoml_server, encode_image, run_training_cli
from training.cli import ExitCode

pytestmark = [pytest.mark.slow]
TOKEN = "feedback-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def animals():
    from training.data.sources import load_animals

    images = load_animals()
    chosen = np.random.default_rng(3).choice(len(images.names), 60, replace=False)
    return [(encode_image(images.pixels[i], "PNG"), str(images.names[i])) for i in chosen]


def settled(url: str, expected: dict, seconds: float = 20.0) -> dict:
    """The scrape once every ``{(metric, labels): value}`` of ``expected`` holds (labels are
    counted when their prediction's row lands, off the request path); then ``SWEEP_SECONDS``
    more, to show that nothing is counted twice."""
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(url)
        if all(
            total(samples, name, **dict(labels)) == value
            for (name, labels), value in expected.items()
        ):
            break
        assert time.monotonic() < deadline, {
            key: total(samples, key[0], **dict(key[1])) for key in expected
        }
        time.sleep(0.1)
    time.sleep(SWEEP_SECONDS + 0.5)
    samples = scrape(url)
    for (name, labels), value in expected.items():
        assert total(samples, name, **dict(labels)) == value, (name, labels)
    return samples


def margin_of(answer: dict) -> float:
    return answer["top_k"][0]["score"] - answer["top_k"][1]["score"]


@pytest.fixture(scope="module")
def capture_margin(offline, animals) -> float:
    """The median top-2 margin of the tiny model on these images: half of them are hard."""
    margins = []
    for data, _ in animals:
        predictions = offline.classify(offline.preprocess(data)[np.newaxis], 1).predictions
        margins.append(float(predictions.margins()[0]))
    return float(np.median(margins))


@pytest.fixture(scope="module")
def loop_server(tiny_run, tmp_path_factory, capture_margin):
    """Feedback and capture on (every hard input, and half of the rest), two API workers."""
    folder = tmp_path_factory.mktemp("loop")
    with bentoml_server(
        tiny_run["folder"],
        workers=2,
        FEEDBACK_TOKEN=TOKEN,
        FEEDBACK_DIR=str(folder / "records"),
        CAPTURE="sample:0.5",
        CAPTURE_MARGIN=str(capture_margin),
        CAPTURE_DIR=str(folder / "captured"),
    ) as url:
        yield {
            "url": url,
            "store": folder / "captured",
            "margin": capture_margin,
            "database": f"sqlite:///{folder / 'records' / 'predictions.sqlite3'}",
        }


def classify(url: str, data: bytes, **headers: str) -> dict:
    response = httpx.post(f"{url}/classify", files={"image": ("a.png", data)}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_answer_has_an_id_of_its_own_and_a_callers_id_starts_it(loop_server, animals):
    url = loop_server["url"]
    data = animals[0][0]
    first, second = classify(url, data), classify(url, data)
    assert len(first["request_id"]) == 32 and first["request_id"] != second["request_id"]
    answered = []
    for _ in range(2):  # the same caller's id twice: two answers, two ids
        response = httpx.post(
            f"{url}/classify",
            files={"image": ("a.png", data)},
            headers={"X-Request-ID": "order-7:a"},
        )
        assert re.fullmatch(r"order-7:a\.[0-9a-f]{16}", response.json()["request_id"])
        assert response.headers["x-request-id"] == "order-7:a"  # echoed for tracing
        answered.append(response.json()["request_id"])
    assert answered[0] != answered[1]
    batch = httpx.post(
        f"{url}/classify_batch",
        files=[("images", ("a.png", data)), ("images", ("b.png", data))],
        headers={"X-Request-ID": "batch-1"},
    ).json()["predictions"]
    ids = [answer["request_id"] for answer in batch]
    assert re.fullmatch(r"batch-1\.[0-9a-f]{16}-0", ids[0]) and ids[1] == ids[0][:-1] + "1"
    for bad in ("x" * 129, "two words", "tab\there", "a/b", "semi;colon"):
        response = httpx.post(
            f"{url}/classify", files={"image": ("a.png", data)}, headers={"X-Request-ID": bad}
        )
        assert response.status_code == 400 and response.json()["error"] == "invalid_request_id"


def test_oip_answers_carry_an_id_per_image(loop_server, offline, animals):
    import tritonclient.http as triton

    from training.data.sources import load_animals

    pixels = load_animals().pixels[:3, ..., np.newaxis]
    client = triton.InferenceServerClient(loop_server["url"].removeprefix("http://"))
    entry = triton.InferInput("image", list(pixels.shape), "UINT8")
    entry.set_data_from_numpy(pixels)
    result = client.infer(offline.name, [entry], headers={"X-Request-ID": "oip-1"})
    ids = result.get_response()["parameters"]["request_ids"]
    assert re.fullmatch(r"oip-1\.[0-9a-f]{16}-0", ids[0])
    assert ids == [ids[0][:-1] + str(position) for position in range(3)]


def test_feedback_gives_live_accuracy_and_confusion_exactly_across_workers(loop_server, animals):
    url = loop_server["url"]
    before = scrape(url)
    answers = [(classify(url, data), truth) for data, truth in animals[:40]]
    items = [{"request_id": answer["request_id"], "label": truth} for answer, truth in answers[:30]]
    # Spread over both workers: one item per request, from a pool of connections.
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda item: httpx.post(f"{url}/feedback", json=item, headers=AUTH), items)
        )
    # Joined when the row had landed, pending (and joined when it lands) when not.
    assert all(response.status_code in (200, 202) for response in responses)
    for response in responses:
        body = response.json()
        assert body["recorded"] == 1 and body["joined"] + body["pending"] == 1
        assert response.status_code == (202 if body["pending"] else 200)
    expected: dict = {}
    for answer, truth in answers[:30]:
        predicted = answer["top_k"][0]["label"]
        correct = str(predicted == truth).lower()
        key = (
            "classifier_feedback_total",
            (("actual", truth), ("correct", correct), ("predicted", predicted)),
        )
        expected[key] = expected.get(key, total(before, key[0], **dict(key[1]))) + 1
    right = sum(answer["top_k"][0]["label"] == truth for answer, truth in answers[:30])
    name = "classifier_feedback_total"
    expected[(name, (("correct", "true"),))] = total(before, name, correct="true") + right
    name = "classifier_feedback_predictions_total"
    expected[(name, ())] = total(before, name) + 30
    after = settled(url, expected)
    scores = sum(answer["score"] for answer, _ in answers[:30])
    assert total(after, "classifier_feedback_score_total") - total(
        before, "classifier_feedback_score_total"
    ) == pytest.approx(scores, rel=1e-6)


def test_repeated_feedback_counts_once_and_the_last_label_wins(loop_server, animals):
    url = loop_server["url"]
    answer = classify(url, animals[41][0])
    predicted = answer["top_k"][0]["label"]
    other = "bear" if predicted != "bear" else "cat"
    item = {"request_id": answer["request_id"], "label": predicted}
    before = scrape(url)
    for _ in range(3):
        assert httpx.post(f"{url}/feedback", json=item, headers=AUTH).status_code in (200, 202)
    feedback, predictions = "classifier_feedback_total", "classifier_feedback_predictions_total"
    middle = settled(
        url,
        {
            (feedback, ()): total(before, feedback) + 1,
            (predictions, ()): total(before, predictions) + 1,
        },
    )
    changed = {"request_id": answer["request_id"], "label": other}
    response = httpx.post(f"{url}/feedback", json=[changed], headers=AUTH)
    assert response.status_code == 200, response.text  # its row has landed by now
    replaced = {"predicted": predicted, "actual": predicted, "correct": "true"}
    key = ("classifier_feedback_replaced_total", tuple(sorted(replaced.items())))
    after = settled(url, {key: total(middle, key[0], **replaced) + 1})

    # Net of the replaced label, the prediction counts once, with its last label.
    def net(samples):
        replaced = total(samples, "classifier_feedback_replaced_total")
        return total(samples, "classifier_feedback_total") - replaced

    assert net(after) - net(before) == 1
    assert total(after, predictions) == total(middle, predictions)


def test_a_label_the_model_does_not_know_is_kept_and_counted_apart(loop_server, animals):
    url = loop_server["url"]
    answer = classify(url, animals[42][0])
    before = scrape(url)
    response = httpx.post(
        f"{url}/feedback",
        json={"request_id": answer["request_id"], "label": "kangaroo"},
        headers=AUTH,
    )
    assert response.json()["recorded"] == 1 and response.json()["new_class"] == 1
    name = "classifier_feedback_new_class_total"
    after = settled(url, {(name, ()): total(before, name) + 1})
    assert total(after, "classifier_feedback_total") == total(before, "classifier_feedback_total")


def test_an_id_never_answered_is_pending_and_counted_nowhere(loop_server, animals):
    url = loop_server["url"]
    answer = classify(url, animals[43][0])
    before = scrape(url)
    items = [
        {"request_id": answer["request_id"], "label": "cat"},
        {"request_id": "never-answered", "label": "cat"},
    ]
    response = httpx.post(f"{url}/feedback", json=items, headers=AUTH)
    assert response.status_code == 202, response.text
    assert "never-answered" in response.json()["pending_ids"]
    # The answered one is counted (once its row lands); the other waits, counted nowhere.
    name = "classifier_feedback_predictions_total"
    settled(url, {(name, ()): total(before, name) + 1})


def test_a_missing_or_wrong_token_gets_401_and_changes_nothing(loop_server, animals):
    url = loop_server["url"]
    answer = classify(url, animals[44][0])
    item = {"request_id": answer["request_id"], "label": "cat"}
    before = scrape(url)
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
    ):
        response = httpx.post(f"{url}/feedback", json=item, headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    after = scrape(url)
    assert total(after, "classifier_feedback_total") == total(before, "classifier_feedback_total")
    for reason in ("missing_token", "wrong_token"):
        name = "classifier_feedback_rejected_total"
        assert total(after, name, reason=reason) - total(before, name, reason=reason) == 1
    # The prediction is still unlabelled: a right token records it now.
    assert httpx.post(f"{url}/feedback", json=item, headers=AUTH).status_code in (200, 202)


def test_a_label_whose_prediction_never_comes_is_orphaned_after_the_retention(
    tiny_run, tmp_path, animals
):
    with bentoml_server(
        tiny_run["folder"],
        workers=1,
        FEEDBACK_TOKEN=TOKEN,
        FEEDBACK_DIR=str(tmp_path),
        FEEDBACK_RETENTION_SECONDS="2",
    ) as url:
        item = {"request_id": "order-never-answered", "label": "cat"}
        response = httpx.post(f"{url}/feedback", json=item, headers=AUTH)
        assert response.status_code == 202 and response.json()["pending_ids"] == [
            item["request_id"]
        ]
        settled(url, {("classifier_feedback_orphaned_total", ()): 1}, seconds=30)


def test_without_a_token_feedback_is_off(server, animals):
    answer = classify(server, animals[0][0])
    item = {"request_id": answer["request_id"], "label": "cat"}
    response = httpx.post(f"{server}/feedback", json=item, headers=AUTH)
    assert response.status_code == 404 and response.json()["error"] == "feedback_off"


def entries(store) -> dict[str, dict]:
    """The complete entries of a capture store, by request id."""
    found = {}
    for folder in sorted(store.iterdir()):
        if folder.name.startswith(".") or folder.name == "labels":
            continue
        answer = json.loads((folder / "answer.json").read_text())
        assert list(folder.glob("input.*")), folder
        found[answer["request_id"]] = answer
    return found


def wait_for(condition, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_unknown_low_margin_and_sampled_inputs_are_captured_with_their_ids(
    loop_server, animals, outlier_image
):
    url, store = loop_server["url"], loop_server["store"]
    flagged = classify(url, outlier_image)
    answers = [classify(url, data) for data, _ in animals[:30]]
    captured_ids = {flagged["request_id"]}
    captured_ids |= {
        answer["request_id"]
        for answer in answers
        if answer["unknown"] or margin_of(answer) < loop_server["margin"]
    }
    wait_for(lambda: captured_ids <= set(entries(store)))
    kept = entries(store)
    assert kept[flagged["request_id"]]["reason"] == "unknown"
    assert kept[flagged["request_id"]]["label"] == "unknown"
    hard = [a for a in answers if a["request_id"] in captured_ids and not a["unknown"]]
    assert hard and all(kept[a["request_id"]]["reason"] == "low_margin" for a in hard)
    rest = {a["request_id"] for a in answers} - captured_ids
    sampled = [i for i in rest if i in kept]
    assert all(kept[i]["reason"] == "sample" for i in sampled)
    # Half of the rest, at random: not all of them (p = 0.5 ** len(rest)).
    assert len(rest) >= 4 and len(sampled) < len(rest)


def test_the_store_keeps_each_inputs_map(loop_server, offline, outlier_image):
    answer = classify(loop_server["url"], outlier_image)  # flagged unknown: always captured
    wait_for(lambda: answer["request_id"] in entries(loop_server["store"]))
    kept = entries(loop_server["store"])[answer["request_id"]]
    expected = offline.predict(offline.preprocess(outlier_image)[np.newaxis]).cams[0]
    assert np.asarray(kept["cam"]).shape == offline.contract.cam_shape
    np.testing.assert_allclose(kept["cam"], expected, atol=1e-3)
    assert "cam" not in answer  # the client did not ask for it


def test_the_store_stays_within_its_bound_under_a_burst(tiny_run, tmp_path, animals):
    from service.http.capture import entry_size

    store = tmp_path / "captured"
    limit = 200_000  # about 16 entries of 12 KiB on disk (folder, input and answer)
    sent = animals * 2
    with bentoml_server(
        tiny_run["folder"],
        workers=2,
        CAPTURE="sample:1",
        CAPTURE_DIR=str(store),
        CAPTURE_MAX_BYTES=str(limit),
    ) as url:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: classify(url, item[0]), sent))
        wait_for(lambda: total(scrape(url), "classifier_captured_total") == len(sent))
        # During a burst each worker trims by its own count of the store, recounted from the
        # folder at least every RESCAN_SECONDS, so the other worker's latest writes may wait for
        # the next recount: one more input after it brings the store within its bound.
        time.sleep(RESCAN_SECONDS + 0.5)
        sent = [*sent, animals[0]]
        classify(url, animals[0][0])
        wait_for(lambda: total(scrape(url), "classifier_captured_total") == len(sent))
        samples = scrape(url)
    folders = [folder for folder in store.iterdir() if not folder.name.startswith(".")]
    sizes = [entry_size(folder.name) for folder in folders]
    # Each entry is counted by what it takes on disk, and the last write recounted the store
    # and trimmed it to the bound.
    for folder, size in zip(folders, sizes, strict=True):
        assert size == sum(p.stat().st_blocks * 512 for p in (folder, *folder.iterdir()))
    assert sum(sizes) <= limit + max(sizes)
    evicted = total(samples, "classifier_capture_evicted_total")
    assert evicted > 0 and evicted == len(sent) - len(sizes)
    assert total(samples, "classifier_capture_evicted_bytes_total") >= evicted * min(sizes)


def test_a_worker_killed_mid_write_leaves_no_half_written_entry(tiny_run, tmp_path, animals):
    store = tmp_path / "captured"
    with serve_on_free_port(
        "service.service:ImageClassifier",
        tiny_run["folder"],
        WORKERS="2",
        CAPTURE="sample:1",
        CAPTURE_DIR=str(store),
    ) as (url, _, pid):
        workers = api_workers(pid)
        assert workers, [child.cmdline() for child in psutil.Process(pid).children(True)]

        def send(item):
            try:
                return httpx.post(f"{url}/classify", files={"image": ("a.png", item[0])})
            except httpx.HTTPError:
                return None

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, item) for item in animals * 3]
            time.sleep(0.3)
            os.kill(workers[0].pid, signal.SIGKILL)
            for future in futures:
                future.result()
    complete = 0
    for folder in store.iterdir():
        if folder.name.startswith(".") or folder.name == "labels":
            continue  # a .partial- folder is not an entry: nothing reads it
        assert (folder / "answer.json").is_file() and list(folder.glob("input.*")), folder
        complete += 1
    assert complete > 0


def test_the_store_becomes_class_folders_and_a_ranked_queue(loop_server, animals, tmp_path):
    url, store = loop_server["url"], loop_server["store"]
    answers = [classify(url, data) for data, _ in animals[:20]]
    wait_for(lambda: len(entries(store)) >= 1)
    kept = entries(store)
    labelled = [(a, truth) for a, (_, truth) in zip(answers, animals[:20], strict=True)]
    labelled = [(a, truth) for a, truth in labelled if a["request_id"] in kept][:5]
    items = [{"request_id": a["request_id"], "label": truth} for a, truth in labelled]
    assert httpx.post(f"{url}/feedback", json=items, headers=AUTH).status_code in (200, 202)
    # The labels of captured inputs are written beside them once claimed; the log has them at once.
    labels_folder = store / "labels"
    wait_for(
        lambda: all((labels_folder / f"{a['request_id']}.json").is_file() for a, _ in labelled)
    )
    output = tmp_path / "data"
    result = run_training_cli("captured", "--store", str(store), "--output", str(output))
    assert result.returncode == 0, result.stderr
    for answer, truth in labelled:
        assert (output / truth / f"{answer['request_id']}.png").is_file()
    with (tmp_path / "data-queue" / "queue.csv").open() as handle:
        queue = list(csv.DictReader(handle))
    kept = entries(store)
    labelled_ids = {a["request_id"] for a, _ in labelled}
    assert {row["request_id"] for row in queue} & labelled_ids == set()
    assert all((tmp_path / "data-queue" / row["file"]).is_file() for row in queue)
    # Ranked: the inputs answered unknown first, then by margin, smallest first.
    unknown = [row["unknown"] == "true" for row in queue]
    assert unknown == sorted(unknown, reverse=True)
    margins = [float(row["margin"]) for row in queue if row["unknown"] == "false"]
    assert margins == sorted(margins)
    # The labels as the log holds them (every replica's feedback): the same class folders.
    from_log = tmp_path / "from-log"
    result = run_training_cli(
        "captured", "--store", str(store), "--output", str(from_log),
        "--database", loop_server["database"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for answer, truth in labelled:
        assert (from_log / truth / f"{answer['request_id']}.png").is_file()


def train(output, *args: str):
    # No data audit: it is tested on its own (test_audit_jobs), and the gate compares the models.
    return run_training_cli(
        "--output", str(output), "--name", "gated", "--no-publish", "--audit", "off", *args
    )  # fmt: skip


def test_a_worse_model_is_refused_and_an_equal_one_is_published(tmp_path):
    # Deterministic ops: the second run of the same options is the same model, so the gate's
    # verdict on it cannot be a false alarm (two merely similar models differ by chance, and a
    # 5% test refuses an equal one 5% of the time by design).
    base = ("--max-per-class", "120", "--epochs", "4", "--deterministic")
    first = train(tmp_path, *base)
    assert first.returncode == 0, first.stderr
    latest = tmp_path / "gated" / "latest"
    reference = latest.resolve()
    worse = train(
        tmp_path,
        "--max-per-class",
        "120",
        "--epochs",
        "1",
        "--learning-rate",
        "0.00001",
        "--compare-with",
        str(reference),
    )
    assert worse.returncode == ExitCode.REFUSED, worse.stdout + worse.stderr
    assert worse.stderr.strip().splitlines()[-1].startswith("refused: ")
    assert latest.resolve() == reference
    refused = sorted(path for path in (tmp_path / "gated").iterdir() if path.name != "latest")[-1]
    report = json.loads((refused / "report.json").read_text())
    assert report["comparison"]["accepted"] is False
    assert report["comparison"]["sets"]["original"]["worse"] is True
    same = train(tmp_path, *base, "--compare-with", str(reference))
    assert same.returncode == 0, same.stdout + same.stderr
    assert latest.resolve() != reference
    comparison = json.loads((latest / "report.json").read_text())["comparison"]
    assert comparison["accepted"] is True
    original = comparison["sets"]["original"]
    assert original["old_only_right"] == original["new_only_right"] == 0  # the same model
