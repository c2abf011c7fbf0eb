"""The audit's out-of-fold predictions kept beside the runs, under a key of everything they
depend on: the selected images (the source's fingerprint, which images, their labels), the
quick model's input, the backbone and its weights, the folds, epochs and seed. A run on
unchanged data (``--resume`` after a stop, or the next run with the same options) reads them
back instead of fitting the quick models again; any change gives another key, and a fresh fit.
Entries are written whole under a temporary name and renamed into place; the newest
:data:`KEEP` stay."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.audit.predictions import OutOfFold

FOLDER = ".audit-cache"  # beside the versions, hidden as .backup is
KEEP = 4
# Raised when the quick models or their predictions change: older entries are then not reused.
VERSION = 1


def cache_key(images, labels: np.ndarray, **options) -> str:
    """The key of the out-of-fold predictions of ``images`` (a ``LabelledImages``) labelled
    ``labels`` with the quick model's ``options``."""
    digest = hashlib.sha256()
    fields = {"version": VERSION, "fingerprint": images.fingerprint, "count": len(images)}
    digest.update(json.dumps(fields | {k: str(v) for k, v in options.items()}).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if images.paths is not None:
        digest.update("\0".join(str(path) for path in images.paths).encode())
    if images.pixels is not None:
        digest.update(np.ascontiguousarray(images.pixels).tobytes())
    return digest.hexdigest()[:32]


def _read(path: Path) -> OutOfFold | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            return OutOfFold(
                probabilities=saved["probabilities"],
                ood_scores=saved["ood_scores"],
                method=str(saved["method"]),
                folds=int(saved["folds"]),
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # absent, cut short, other
        return None


def _write(folder: Path, path: Path, oof: OutOfFold) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".npz")
    with os.fdopen(handle, "wb") as file:
        np.savez(
            file,
            probabilities=oof.probabilities,
            ood_scores=oof.ood_scores,
            method=np.asarray(oof.method),
            folds=np.asarray(oof.folds),
        )
    os.replace(partial, path)
    entries = sorted(folder.glob("*.npz"), key=lambda entry: entry.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)


def cached(
    predict: Callable[[], OutOfFold], folder: Path, key: str, say: Callable[[str], None] = print
) -> Callable[[], OutOfFold]:
    """``predict``, answered from ``folder`` when it holds the predictions of ``key``; else
    run, and its predictions stored there."""

    def read_or_fit() -> OutOfFold:
        path = folder / f"{key}.npz"
        found = _read(path)
        if found is not None:
            say(f"audit: out-of-fold predictions of unchanged data reused from {path}")
            os.utime(path)  # the newest stay
            return found
        say("audit: fitting the out-of-fold quick models (reused next time the data is unchanged)")
        oof = predict()
        try:
            _write(folder, path, oof)
        except OSError as error:  # a read-only output: the run goes on without the cache
            say(f"audit: the out-of-fold predictions were not kept ({error})")
        return oof

    return read_or_fit
