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

from service.core.capture_layout import (
    ANSWER_FILE,
    INPUT_STEM,
    LABELS_FOLDER,
    is_safe_name,
    parse_entry_name,
)
from service.store.database import LogUnreadable, reading
from service.store.schema import labels as label_table
from training.command_config import CapturedConfig
from training.data.sources import DataError

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


@dataclass
class Store:
    """A capture store as read: its complete entries, and what could not be used, each with
    why (a file a crash left half-written, a label that is not a safe folder name)."""

    entries: list[Captured]
    skipped: list[str]


def _read_json(path: Path, skipped: list[str]) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        skipped.append(f"{path}: unreadable ({error})")
        return None
    if not isinstance(content, dict):
        skipped.append(f"{path}: not a JSON object")
        return None
    return content


def read_store(store: Path, database: str = "") -> Store:
    """The complete entries of a capture store with their labels (partial entries, which a
    process killed mid-write left, are not entries): from the store's ``labels/`` files, or with
    ``database`` from the prediction log. A file that cannot be read is skipped and named; a
    request id held by more than one entry labels none of them."""
    if not store.is_dir():
        raise DataError(
            f"{store} is not a capture store: point --store at the service's CAPTURE_DIR"
        )
    skipped: list[str] = []
    labels = {}
    for path in sorted((store / LABELS_FOLDER).glob("*.json")):
        if path.name.startswith("."):
            continue  # a label file being written, or left half-written by a crash
        content = _read_json(path, skipped)
        if content is None:
            continue
        if not isinstance(content.get("request_id"), str) or not isinstance(
            content.get("label"), str
        ):
            skipped.append(f"{path}: no request_id and label")
            continue
        labels[content["request_id"]] = (content["label"], content.get("at", 0.0))
    found = []
    for folder in sorted(path for path in store.iterdir() if parse_entry_name(path.name)):
        inputs = sorted(folder.glob(f"{INPUT_STEM}.*"))
        if not inputs or not (folder / ANSWER_FILE).is_file():
            continue
        answer = _read_json(folder / ANSWER_FILE, skipped)
        if answer is None or not isinstance(answer.get("request_id"), str):
            if answer is not None:
                skipped.append(f"{folder / ANSWER_FILE}: no request_id")
            continue
        found.append(Captured(folder, inputs[0], answer))
    if database:
        labels = database_labels(database, [entry.request_id for entry in found])
    holders: dict[str, int] = {}
    for entry in found:
        holders[entry.request_id] = holders.get(entry.request_id, 0) + 1
    for entry in found:
        label, at = labels.get(entry.request_id, (None, 0.0))
        if label is not None and holders[entry.request_id] > 1:
            skipped.append(f"{entry.folder}: its id is held by another input too; not labelled")
            label, at = None, 0.0
        if label is not None and not is_safe_name(label):
            skipped.append(
                f"{entry.folder}: label {label!r} is not a safe folder name; not labelled"
            )
            label, at = None, 0.0
        entry.label, entry.label_at = label, at
    return Store(found, skipped)


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


def file_stem(request_id: str) -> str:
    """A request id as a file name: itself when it is one plain name (ids may hold ``:``, or
    start with ``.``), else ``id-`` and a digest of it; ``queue.csv`` keeps the id itself."""
    if is_safe_name(request_id):
        return request_id
    return "id-" + hashlib.sha256(request_id.encode()).hexdigest()[:16]


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, checked on the resolved path to be a direct child of ``folder``."""
    target = (folder / name).resolve()
    if not is_safe_name(name) or target.parent != folder.resolve():
        raise DataError(f"{name!r} is not a safe file name inside {folder}")
    return target


def write_training_folder(entries: list[Captured], output: Path) -> dict[str, int]:
    """The labelled entries as class folders; returns the count per label. Every label and
    file name is checked to stay inside its folder (:func:`_inside`)."""
    staging = _staged(output)
    counts: dict[str, int] = {}
    for entry in entries:
        folder = _inside(staging, entry.label)
        folder.mkdir(exist_ok=True)
        name = f"{file_stem(entry.request_id)}{entry.input.suffix}"
        shutil.copyfile(entry.input, _inside(folder, name))
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
            name = f"{rank:06d}-{file_stem(entry.request_id)}{entry.input.suffix}"
            shutil.copyfile(entry.input, _inside(staging, name))
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
    store = read_store(config.store, config.database)
    entries = store.entries
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
        + "".join(f"\nskipped {reason}" for reason in store.skipped)
    )
