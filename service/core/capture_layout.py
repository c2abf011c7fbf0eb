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


# Names that a file system or an older tool treats as more than one plain name.
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def is_safe_name(name: str) -> bool:
    """Whether ``name`` is one plain path component on every system: not empty, no separator
    (``/`` or ``\\``), drive colon, NUL or other control character, not hidden or ``.``/``..``,
    no leading or trailing space, and not a Windows device name. Labels become class folders,
    so they are checked with this where they are taken and again where they are written."""
    return bool(
        name
        and name == name.strip()
        and not name.startswith(".")
        and not any(ch in name for ch in "/\\:")
        and all(ch.isprintable() for ch in name)
        and not _RESERVED.match(name)
    )
