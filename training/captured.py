"""``python -m training captured``: the service's capture store (``CAPTURE_DIR``) as the next
training run's data.

- Inputs with a feedback label go into the class-folder layout ``--data`` reads:
  ``<output>/<label>/<request id>.<ext>``.
- Unlabelled inputs go into a queue folder for a person to label, ranked by how much a label
  would teach: first the inputs the detector flagged ``unknown`` (most unlike the training data
  first: they show what the model has never seen), then the others by their top-2 margin,
  smallest first (margin sampling: where the model hesitates between two classes, a label moves
  the boundary most). ``queue.csv`` lists them in that order.
- Exact copies (the same bytes sent twice) are kept once, with the latest label any of them got.

Both folders are written under temporary names and renamed into place when complete; an
existing folder is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from service.core.capture_layout import ANSWER_FILE, INPUT_STEM, LABELS_FOLDER, parse_entry_name
from service.store.database import LogUnreadable, reading
from service.store.schema import labels as label_table
from training.config import CapturedConfig
from training.sources import DataError

QUEUE_COLUMNS = (
    "rank",
    "file",
    "request_id",
    "reason",
    "predicted",
    "score",
    "margin",
    "unknown",
    "ood_score",
)


@dataclass
class Captured:
    """One captured input, with the answer it got and its feedback label, if any."""

    folder: Path
    input: Path
    answer: dict
    label: str | None = None
    label_at: float = 0.0

    @property
    def request_id(self) -> str:
        return self.answer["request_id"]

    def priority(self) -> tuple:
        """Sort key of the labelling queue: unknown first (by score over threshold, highest
        first), then by top-2 margin, smallest first."""
        ood, threshold = self.answer.get("ood_score"), self.answer.get("ood_threshold")
        ratio = ood / threshold if ood is not None and threshold else 0.0
        if self.answer.get("unknown"):
            return (0, -ratio)
        return (1, self.answer.get("margin", 1.0))


def database_labels(url: str, request_ids: list[str]) -> dict[str, tuple[str, float]]:
    """``{request_id: (label, received_at)}`` of ``request_ids`` from the prediction log."""
    found = {}
    columns = label_table.c.request_id, label_table.c.label, label_table.c.received_at
    try:
        with reading(url) as (connection, _):
            for start in range(0, len(request_ids), 1000):
                chosen = label_table.c.request_id.in_(request_ids[start : start + 1000])
                for request_id, label, at in connection.execute(select(*columns).where(chosen)):
                    found[request_id] = (label, at)
    except LogUnreadable as error:
        raise DataError(f"--database {error}") from None
    return found


def read_store(store: Path, database: str = "") -> list[Captured]:
    """The complete entries of a capture store with their labels (partial entries, which a
    process killed mid-write left, are not entries): from the store's ``labels/`` files, or with
    ``database`` from the prediction log."""
    if not store.is_dir():
        raise DataError(
            f"{store} is not a capture store: point --store at the service's CAPTURE_DIR"
        )
    labels = {}
    for path in sorted((store / LABELS_FOLDER).glob("*.json")):
        content = json.loads(path.read_text())
        labels[content["request_id"]] = (content["label"], content.get("at", 0.0))
    found = []
    for folder in sorted(path for path in store.iterdir() if parse_entry_name(path.name)):
        inputs = sorted(folder.glob(f"{INPUT_STEM}.*"))
        if not inputs or not (folder / ANSWER_FILE).is_file():
            continue
        answer = json.loads((folder / ANSWER_FILE).read_text())
        found.append(Captured(folder, inputs[0], answer))
    if database:
        labels = database_labels(database, [entry.request_id for entry in found])
    for entry in found:
        entry.label, entry.label_at = labels.get(entry.request_id, (None, 0.0))
    return found


def without_copies(entries: list[Captured]) -> list[Captured]:
    """One entry per distinct input (by its bytes), with the latest label any copy got."""
    groups: dict[str, list[Captured]] = {}
    for entry in entries:
        digest = hashlib.sha256(entry.input.read_bytes()).hexdigest()
        groups.setdefault(digest, []).append(entry)
    kept = []
    for copies in groups.values():
        labelled = [copy for copy in copies if copy.label is not None]
        kept.append(max(labelled, key=lambda copy: copy.label_at) if labelled else copies[0])
    return kept


def _staged(final: Path) -> Path:
    if final.exists():
        raise DataError(f"{final} exists: choose another folder, or delete it first")
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_training_folder(entries: list[Captured], output: Path) -> dict[str, int]:
    """The labelled entries as class folders; returns the count per label."""
    staging = _staged(output)
    counts: dict[str, int] = {}
    for entry in entries:
        (staging / entry.label).mkdir(exist_ok=True)
        target = staging / entry.label / f"{entry.request_id}{entry.input.suffix}"
        shutil.copyfile(entry.input, target)
        counts[entry.label] = counts.get(entry.label, 0) + 1
    os.rename(staging, output)
    return counts


def write_queue(entries: list[Captured], queue: Path) -> Path:
    """The unlabelled entries, ranked, as files named by rank, and ``queue.csv``."""
    staging = _staged(queue)
    ranked = sorted(entries, key=Captured.priority)
    with (staging / "queue.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(QUEUE_COLUMNS)
        for rank, entry in enumerate(ranked, start=1):
            name = f"{rank:06d}-{entry.request_id}{entry.input.suffix}"
            shutil.copyfile(entry.input, staging / name)
            answer = entry.answer
            writer.writerow(
                [
                    rank,
                    name,
                    entry.request_id,
                    answer.get("reason", ""),
                    answer["top_k"][0]["label"],
                    f"{answer['score']:.6f}",
                    f"{answer.get('margin', 0.0):.6f}",
                    str(answer.get("unknown", False)).lower(),
                    "" if answer.get("ood_score") is None else f"{answer['ood_score']:.4f}",
                ]
            )
    os.rename(staging, queue)
    return queue / "queue.csv"


def export_captured(config: CapturedConfig) -> str:
    """Write the training folder and the queue; returns the summary line."""
    entries = read_store(config.store, config.database)
    distinct = without_copies(entries)
    labelled = [entry for entry in distinct if entry.label is not None]
    unlabelled = [entry for entry in distinct if entry.label is None]
    queue = config.queue or config.output.with_name(f"{config.output.name}-queue")
    counts = write_training_folder(labelled, config.output)
    listing = write_queue(unlabelled, queue)
    per_label = ", ".join(f"{label} {count}" for label, count in sorted(counts.items()))
    return (
        f"{len(entries)} captured inputs, {len(entries) - len(distinct)} copies dropped: "
        f"{len(labelled)} labelled into {config.output} ({per_label or 'none'}), "
        f"{len(unlabelled)} to label in {listing}"
    )
