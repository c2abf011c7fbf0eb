"""Batch inference at scale: shards chosen by a stable hash with no coordination, part files that
are written as rows are produced and renamed into place only when complete, and the merge of a
run's parts into one file.

N processes, on one machine or N pods of a Kubernetes Indexed Job, each run
``python -m service.predict INPUTS --shard I/N --output FOLDER``: each keeps the files whose
stable hash (of the path relative to its input root) falls in shard I, so together they classify
every file exactly once. Then ``python -m service.predict merge FOLDER --output FILE``.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PART_FORMATS = ("csv", "jsonl")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PART_NAME = re.compile(r"^part-(\d{5})-of-(\d{5})\.json$")


class BatchError(ValueError):
    """A sharding, resume or merge problem; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based), as ``--shard index/count`` names it."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = _SHARD.match(text)
        if not match or not int(match[1]) < int(match[2]):
            raise BatchError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 3/10")
        return cls(int(match[1]), int(match[2]))

    def holds(self, key: str) -> bool:
        """Whether the file of ``key`` (its path relative to its input root) is in this shard:
        the same answer on every machine and every run."""
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class PartFiles:
    """Where one shard writes: rows under a temporary name while it runs, renamed when complete,
    and a summary beside them, written last (the mark of a complete part)."""

    final: Path
    partial: Path
    summary: Path | None

    @classmethod
    def for_shard(cls, folder: Path, shard: Shard, suffix: str) -> PartFiles:
        return cls(
            folder / f"{shard.name}.{suffix}",
            folder / f".{shard.name}.{suffix}.partial",
            folder / f"{shard.name}.json",
        )

    @classmethod
    def for_file(cls, path: Path) -> PartFiles:
        return cls(path, path.with_name(f".{path.name}.partial"), None)


def complete_lines(path: Path) -> None:
    """Cut a partial file back to its last complete line (a kill can leave half a row)."""
    with path.open("rb+") as handle:
        data = handle.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            handle.truncate(end)


def read_rows(path: Path, fmt: str) -> Iterator[dict]:
    """The rows of a part or partial file, as dicts (CSV values are strings)."""
    with path.open(newline="") as handle:
        if fmt == "csv":
            yield from csv.DictReader(handle)
        else:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def write_summary(path: Path, summary: dict) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, path)


def find_parts(folder: Path) -> tuple[int, dict[int, dict]]:
    """The shard count of the parts in ``folder`` and each complete part's summary, by index.

    Raises:
        BatchError: no part, or parts of different shard counts.
    """
    summaries, counts = {}, set()
    for path in sorted(folder.glob("part-*-of-*.json")):
        match = _PART_NAME.match(path.name)
        if match:
            counts.add(int(match[2]))
            summaries[int(match[1])] = json.loads(path.read_text())
    if not counts:
        raise BatchError(f"{folder} holds no complete part (part-IIIII-of-NNNNN.json)")
    if len(counts) > 1:
        raise BatchError(f"{folder} mixes parts of {sorted(counts)} shards: one run per folder")
    return counts.pop(), summaries


def check_parts(folder: Path) -> dict[int, dict]:
    """Every shard's summary, by index, once each part is known to exist, be complete and come
    from the same model.

    Raises:
        BatchError: a part is missing or incomplete (named), or the parts disagree.
    """
    count, summaries = find_parts(folder)
    missing = [index for index in range(count) if index not in summaries]
    if missing:
        named = ", ".join(f"{index}/{count}" for index in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise BatchError(
            f"{len(missing)} of {count} shards missing or incomplete in {folder}: {named}{more}; "
            "run them (again with --resume) before merging"
        )
    models = {json.dumps(summary["model"], sort_keys=True) for summary in summaries.values()}
    if len(models) > 1:
        raise BatchError(f"the parts in {folder} come from different models: {sorted(models)}")
    return summaries


def merged_rows(folder: Path, summaries: dict[int, dict]) -> Iterator[dict]:
    """All parts' rows in path order, streaming: each part is sorted, so memory stays flat."""
    streams = [
        read_rows(folder / summary["file"], summary["format"])
        for _, summary in sorted(summaries.items())
    ]
    return heapq.merge(*streams, key=lambda row: row["path"])
