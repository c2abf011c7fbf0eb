"""The capture store's layout, which the service writes and the training job reads: one folder
per input, ``<time_ns>-<bytes>-<request id>/`` with ``input.<ext>`` and ``answer.json``, and the
feedback labels in ``labels/<request id>.json``."""

from __future__ import annotations

import re

ANSWER_FILE = "answer.json"
INPUT_STEM = "input"
LABELS_FOLDER = "labels"
_ENTRY = re.compile(r"^(\d+)-(\d+)-(.+)$")


def entry_name(time_ns: int, size: int, request_id: str) -> str:
    """The folder name of an entry: sorting the names sorts the entries by age."""
    return f"{time_ns}-{size}-{request_id}"


def parse_entry_name(name: str) -> tuple[int, int, str] | None:
    """``(time_ns, bytes, request id)`` of an entry's folder name; None for anything else."""
    match = _ENTRY.match(name)
    return (int(match[1]), int(match[2]), match[3]) if match else None
