"""The CLI's rows and how they are written: an aligned table for a terminal, CSV, or JSON lines.
A row is a dict, fresh from a run (``top_k`` a list) or read back from a part file (CSV values
are strings); the helpers here read both."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Row:
    path: str
    label: str | None = None  # "unknown" for an input the detector flags (see --unknown-label)
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    unknown: bool | None = None
    ood_score: float | None = None
    error: str | None = None


def first_label(row: dict) -> str | None:
    """The top class of a row, whether ``top_k`` is a list (fresh) or CSV text (read back)."""
    top = row.get("top_k")
    if isinstance(top, str):
        return top.split(";")[0].rsplit(":", 1)[0] if top else None
    return top[0]["label"] if top else None


def is_flagged(row: dict) -> bool:
    """Whether the unknown-input detector flagged the row's image (fresh or read back)."""
    value = row.get("unknown")
    return value is True or value == "true"


def _ood(row: dict) -> str:
    if row.get("ood_score") in (None, ""):
        return "-"
    return f"{float(row['ood_score']):.2f}{'!' if is_flagged(row) else ''}"


class TableWriter:
    """Aligned columns for a terminal; ``width`` is the longest path of the run."""

    def __init__(self, stream, width: int = 4, header: bool = True) -> None:
        self.stream, self.width = stream, max(width, 4)
        if header:
            title = f"{'file':<{self.width}}  {'label':<14} {'score':>6} {'ood':>7}  top-k / error"
            stream.write(title + "\n")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            path = f"{row['path']:<{self.width}}"
            if row.get("error"):
                self.stream.write(f"{path}  {'-':<14} {'-':>6} {'-':>7}  {row['error']}\n")
                continue
            top = ", ".join(f"{entry['label']} {entry['score']:.2f}" for entry in row["top_k"])
            score = f"{row['score']:>6.3f}"
            self.stream.write(f"{path}  {row['label']:<14} {score} {_ood(row):>7}  {top}\n")


class CsvWriter:
    COLUMNS = ("path", "label", "score", "top_k", "unknown", "ood_score", "error")

    def __init__(self, stream, width: int = 0, header: bool = True) -> None:
        self.writer = csv.writer(stream)
        if header:
            self.writer.writerow(self.COLUMNS)

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if isinstance(row.get("top_k"), str):  # read back from a CSV part: as it was
                self.writer.writerow([row.get(column) or "" for column in self.COLUMNS])
                continue
            top = ";".join(f"{entry['label']}:{entry['score']:.6f}" for entry in row["top_k"])
            score = "" if row["score"] is None else f"{row['score']:.6f}"
            unknown = "" if row["unknown"] is None else str(row["unknown"]).lower()
            ood = "" if row["ood_score"] is None else f"{row['ood_score']:.6f}"
            self.writer.writerow(
                [row["path"], row["label"] or "", score, top, unknown, ood, row["error"] or ""]
            )


class JsonlWriter:
    def __init__(self, stream, width: int = 0, header: bool = True) -> None:
        self.stream = stream

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.stream.write(json.dumps(row) + "\n")


# Output formats: --format's choices are this table's keys.
WRITERS = {"table": TableWriter, "csv": CsvWriter, "jsonl": JsonlWriter}


def chunks(rows: Iterator[dict], size: int = 1000) -> Iterator[list[dict]]:
    """``rows`` in lists of ``size``, so that a long file streams through with flat memory."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
