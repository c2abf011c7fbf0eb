"""A challenger in the shadow of the served model, judged on the labels that come back: a real
``bentoml serve`` (two workers) with ``SHADOW_MODEL``, a real PostgreSQL prediction log, and
``python -m training rollout``. A challenger trained on 30% flipped labels is rejected, and never
promoted in any of 20 seeded replays of the feedback stream; one trained on more data, longer,
is promoted, becomes ``latest``, and the service swaps to it."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy
from PIL import Image

from benchmarks.servers import scrape, total
from benchmarks.servers import server as serve_on_free_port
from service.store.database import create_engine, database_url
from service.store.schema import rollout_events, shadow_predictions
from tests.helpers import encode_image, run_training_cli
from training.cli import ExitCode
from training.command_config import RolloutConfig
from training.quality.rollout import read_evidence
from training.quality.sequential import PROMOTE, REJECT, decide

pytestmark = [pytest.mark.slow]

TOKEN = "rollout-token"
# Images per class: the champion's and the worse challenger's training set, the better one's,
# and the held-out images the feedback stream labels (after both, unseen by every model).
CHAMPION_PER_CLASS, BETTER_PER_CLASS, STREAM_PER_CLASS = 60, 200, 150
REPLAYS = 20


def write_folder(root: Path, images, per_class: int, flip: float = 0.0, seed: int = 0) -> Path:
    """The first ``per_class`` images of each class as PNG class folders; ``flip`` of them filed
    under another class, chosen at random."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(images.names))
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name in classes:
        chosen = np.flatnonzero(images.names == name)[:per_class]
        for index in chosen:
            target = name
            if rng.random() < flip:
                target = rng.choice([other for other in classes if other != name])
            Image.fromarray(images.pixels[index]).save(root / target / f"{index}.png")
    return root


def train(data: Path, output: Path, epochs: int, *extra: str) -> Path:
    result = run_training_cli(
        "--data", str(data), "--image-size", "28", "--epochs", str(epochs), "--output",
        str(output), "--name", "animals", "--no-publish", "--audit", "off", "--deterministic",
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return max(path for path in (output / "animals").iterdir() if path.name[0].isdigit())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The champion, a worse challenger (30% of its labels flipped) and a better one (more data,
    longer), each trained by the job on folders of the built-in images; and the stream."""
    from training.data.sources import load_animals

    images = load_animals()
    root = tmp_path_factory.mktemp("rollout")
    clean = write_folder(root / "clean", images, CHAMPION_PER_CLASS)
    flipped = write_folder(root / "flipped", images, CHAMPION_PER_CLASS, flip=0.3)
    more = write_folder(root / "more", images, BETTER_PER_CLASS)
    output = root / "artifacts"
    champion = train(clean, output, 4)
    worse = train(flipped, output, 4, "--no-latest")
    better = train(more, output, 8, "--no-latest")
    assert (output / "animals" / "latest").resolve() == champion  # the challengers are not
    stream = []
    for name in sorted(set(images.names)):
        chosen = np.flatnonzero(images.names == name)[BETTER_PER_CLASS:][:STREAM_PER_CLASS]
        stream += [(encode_image(images.pixels[index], "PNG"), name) for index in chosen]
    order = np.random.default_rng(1).permutation(len(stream))
    return {"champion": champion, "worse": worse, "better": better,
            "stream": [stream[i] for i in order], "model_dir": output / "animals"}  # fmt: skip


@contextlib.contextmanager
def shadow_and_label(models, postgres, challenger: Path, **env: str) -> dict:
    """Serve the champion with ``challenger`` in the shadow, classify the stream in batches of 30
    and send its true labels back; the log's URL and the server's metrics."""
    url_db = postgres.new_database()
    model_dir = models["model_dir"]
    with serve_on_free_port(
        "service.service:ImageClassifier",
        model_dir / "latest",
        WORKERS="2",
        BATCHING="off",
        SHADOW_MODEL=str(challenger),
        SHADOW_SHARE="1",
        FEEDBACK_TOKEN=TOKEN,
        DATABASE_URL=url_db,
        MODEL_WATCH_SECONDS="0.5",
        **env,
    ) as (url, _, _pid):
        stream = models["stream"]
        with httpx.Client(timeout=60) as client:
            for start in range(0, len(stream), 30):
                chunk = stream[start : start + 30]
                files = [("images", (f"{i}.png", data)) for i, (data, _) in enumerate(chunk)]
                answers = client.post(f"{url}/classify_batch", files=files)
                assert answers.status_code == 200, answers.text
                feedback = [
                    {"request_id": answer["request_id"], "label": label}
                    for answer, (_, label) in zip(answers.json()["predictions"], chunk, strict=True)
                ]
                sent = client.post(f"{url}/feedback", json=feedback,
                                   headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                assert sent.status_code in (200, 202), sent.text
                # One batch at a time through the shadow, as a steady trickle of traffic would
                # go: the challenger runs at the lowest priority, and a busy machine (the other
                # test worker) would otherwise have it shed most of a burst.
                wait_for_shadow(url, start + len(chunk))
        deadline = time.monotonic() + 30
        while shadowed(url_db) < len(stream) - shed(url):
            assert time.monotonic() < deadline, (shadowed(url_db), shed(url))
            time.sleep(0.5)
        yield url, url_db


def wait_for_shadow(url: str, images: int, timeout: float = 60) -> None:
    """Until the challenger has answered or shed ``images`` images."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        done = total(samples, "classifier_shadow_predictions_total") + total(
            samples, "classifier_shadow_shed_total"
        )
        if done >= images:
            return
        assert time.monotonic() < deadline, f"the shadow answered {done} of {images} images"
        time.sleep(0.05)


def query(url_db: str, statement):
    with create_engine(database_url(url_db, None)).connect() as connection:
        return connection.execute(statement).all()


def shadowed(url_db: str) -> int:
    try:
        return query(url_db, sqlalchemy.select(sqlalchemy.func.count()).select_from(
            shadow_predictions))[0][0]  # fmt: skip
    except sqlalchemy.exc.ProgrammingError:  # not migrated yet
        return 0


def shed(url: str) -> float:
    return total(scrape(url), "classifier_shadow_shed_total")


def rollout(url_db: str, tmp_path: Path, *extra: str):
    output = tmp_path / "rollout.json"
    result = run_training_cli("rollout", "--database", url_db, "--output", str(output), *extra)
    return result, (json.loads(output.read_text()) if output.is_file() else None)


def replays(url_db: str) -> list:
    """The sequential decision over 20 seeded reorderings of the labelled pairs."""
    rows = [row for row in read_evidence(RolloutConfig(database=url_db))["rows"] if row[6]]
    champion = np.array([row[1] == row[6] for row in rows])
    challenger = np.array([row[4] == row[6] for row in rows])
    decisions = []
    for seed in range(REPLAYS):
        order = np.random.default_rng(seed).permutation(len(rows))
        decisions.append(decide(champion[order], challenger[order]))
    return decisions


def test_a_challenger_trained_on_flipped_labels_is_rejected_and_never_promoted(
    models, postgres, tmp_path
):
    with shadow_and_label(models, postgres, models["worse"]) as (url, url_db):
        check_rejected(models, url, url_db, tmp_path)


def check_rejected(models, url: str, url_db: str, tmp_path: Path) -> None:
    samples = scrape(url)
    agree = total(samples, "classifier_shadow_predictions_total", agree="true")
    disagree = total(samples, "classifier_shadow_predictions_total", agree="false")
    assert agree + disagree + shed(url) == len(models["stream"])
    result, figures = rollout(url_db, tmp_path, "--promote", str(models["model_dir"]))
    assert result.returncode == ExitCode.REJECTED, result.stdout + result.stderr
    assert figures["decision"] == REJECT and not figures["promoted"]
    assert figures["challenger_accuracy"] < figures["champion_accuracy"], figures
    assert "decision: reject" in result.stdout
    assert models["model_dir"].joinpath("latest").resolve() == models["champion"]
    decisions = replays(url_db)
    assert all(d.decision == REJECT for d in decisions), [d.decision for d in decisions]
    labels_needed = sorted(d.decided_at for d in decisions)
    print(f"\nworse challenger: {figures}; rejected after {labels_needed} labels in the replays")
    events = query(url_db, sqlalchemy.select(rollout_events))
    assert [(e.decision, e.promoted) for e in events] == [("reject", False)]


def test_a_better_challenger_is_promoted_and_the_service_swaps_to_it(models, postgres, tmp_path):
    with shadow_and_label(models, postgres, models["better"]) as (url, url_db):
        check_promoted(models, url, url_db, tmp_path)


def check_promoted(models, url: str, url_db: str, tmp_path: Path) -> None:
    result, figures = rollout(url_db, tmp_path, "--promote", str(models["model_dir"]))
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    assert figures["decision"] == PROMOTE and figures["promoted"], figures
    assert models["model_dir"].joinpath("latest").resolve() == models["better"]
    better_version = models["better"].name
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=30) as client:
        while client.get(f"{url}/model").json()["version"] != better_version:
            assert time.monotonic() < deadline, "the service did not swap to the promoted model"
            time.sleep(0.2)
    decisions = replays(url_db)
    assert all(d.decision == PROMOTE for d in decisions), [d.decision for d in decisions]
    labels_needed = sorted(d.decided_at for d in decisions)
    print(f"\nbetter challenger: {figures}; promoted after {labels_needed} labels in the replays")
    events = query(url_db, sqlalchemy.select(rollout_events))
    assert [(e.decision, e.promoted) for e in events] == [("promote", True)]
