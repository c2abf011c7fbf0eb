"""Training that loses nothing: the state of every completed epoch is kept (Keras
``BackupAndRestore``), ``--resume`` continues from it, and SIGTERM (as Kubernetes sends) stops the
run at the next batch with that state intact."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import keras

from training.config import ConfigError, TrainConfig

BACKUP_FOLDER = ".backup"
HISTORY_FILE = "history.csv"


class TrainingStopped(Exception):
    """The run was stopped by a signal after saving the state of its last completed epoch."""


def backup_dir(config: TrainConfig) -> Path:
    return Path(config.output) / config.name / BACKUP_FOLDER


def _comparable(config: TrainConfig) -> dict:
    """The options that must match for a run to be resumed, as JSON gives them back."""
    values = config.to_dict()
    values.pop("resume", None)
    return json.loads(json.dumps(values))


def prepare_backup(config: TrainConfig) -> Path:
    """The backup folder for this run: emptied for a new run, checked for ``--resume``."""
    folder = backup_dir(config)
    saved = folder / "config.json"
    if config.resume and saved.is_file():
        if json.loads(saved.read_text()) != _comparable(config):
            raise ConfigError(
                f"{folder} holds an interrupted run with other options: resume it with the "
                "same options, or start afresh without --resume"
            )
        print(f"resuming the interrupted run saved in {folder}")
        return folder
    if config.resume:
        print(f"--resume: no interrupted run in {folder}; starting from epoch 1")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    saved.write_text(json.dumps(_comparable(config), indent=2))
    return folder


class _StopWhenSignalled(keras.callbacks.Callback):
    def __init__(self, received: list[int]):
        super().__init__()
        self.received = received

    def on_train_batch_end(self, batch, logs=None):
        if self.received:
            # Raising (rather than stop_training) skips on_train_end, which would delete the
            # backup of the last completed epoch.
            raise TrainingStopped(signal.Signals(self.received[0]).name)


def resumable_callbacks(folder: Path, received: list[int]) -> list:
    """Keep each epoch's state and history in ``folder``; stop when ``received`` fills."""
    return [
        keras.callbacks.BackupAndRestore(str(folder / "state"), delete_checkpoint=False),
        keras.callbacks.CSVLogger(str(folder / HISTORY_FILE), append=True),
        _StopWhenSignalled(received),
    ]


@contextlib.contextmanager
def signals_recorded(*signals: signal.Signals) -> Iterator[list[int]]:
    """Record these signals instead of dying on them, for the duration of the block."""
    received: list[int] = []
    previous = {
        number: signal.signal(number, lambda n, _frame: received.append(n)) for number in signals
    }
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def read_history(folder: Path) -> dict[str, list[float]]:
    """The whole run's history, epochs before an interruption included."""
    with (folder / HISTORY_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    keys = [key for key in rows[0] if key != "epoch"] if rows else []
    return {key: [float(row[key]) for row in rows] for key in keys}
