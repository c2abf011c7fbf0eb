"""The training job's command line: ``python -m training [options]`` trains (and by default
exports and publishes); ``COMMANDS``, the one list of commands, names the others, each with its
config class (its options are derived from it), its description and the function of
:mod:`training.commands` that runs it. ``ExitCode`` is the exit status of each outcome."""

from __future__ import annotations

import argparse
import enum
import sys
from typing import NamedTuple

from service.core.options import add_dataclass_options
from training.command_config import (
    AuditConfig,
    CapturedConfig,
    DriftConfig,
    ExportConfig,
    FaithfulnessConfig,
    FetchWeightsConfig,
    MonitorConfig,
    RolloutConfig,
    SamplesConfig,
)
from training.config import TrainConfig


class ExitCode(enum.IntEnum):
    """The training job's exit status, by cause; the README's table is generated from it."""

    def __new__(cls, code: int, meaning: str):
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning = meaning
        return member

    OK = 0, "done"
    UNFAITHFUL = 1, "`faithfulness`: the map failed the deletion test"
    USAGE = 2, "an option, or a combination of options, is wrong (argparse's status too)"
    REFUSED = 3, "`--compare-with` found the new model worse: nothing was published"
    DATA = 4, "the images, their labels or their folder cannot be used, or the audit stopped"
    MODEL = 5, "a model or artifact cannot be read, exported (the parity gate) or published"
    WEIGHTS = 6, "a backbone's weights cannot be had (offline, or a file of another backbone)"
    REJECTED = 7, "`rollout`: the evidence rejected the challenger in the shadow"
    INTERRUPTED = 130, "interrupted (Ctrl-C): no new version was written"
    STOPPED = 143, "stopped by SIGTERM: the last completed epoch is kept for `--resume`"


class Command(NamedTuple):
    config: type
    description: str
    run: str  # the function of training.commands that runs it


# Each command; `python -m training` alone (None) trains.
COMMANDS = {
    None: Command(
        TrainConfig,
        "Train an image classifier on labelled images, evaluate it on a held-out test split, "
        "export it to ONNX behind a parity gate and publish it to the BentoML model store. "
        "'python -m training export --help' re-exports an existing artifact; "
        "'python -m training samples --help' writes held-out test images to try it on; "
        "'python -m training audit --help' checks the data alone.",
        run="train",
    ),
    "audit": Command(
        AuditConfig,
        "Audit labelled images and write a report (report.md, report.json, relabel.csv, contact "
        "sheets): unreadable and odd files, exact and near duplicates (also under different "
        "labels), likely label errors (confident learning on out-of-fold probabilities), images "
        "that look like no class, class imbalance. The training job runs the same audit first.",
        run="audit",
    ),
    "export": Command(
        ExportConfig,
        "Export an artifact folder's model.keras to model.onnx, check it against Keras (the "
        "parity gate) and publish it to the BentoML model store.",
        run="export",
    ),
    "fetch-weights": Command(
        FetchWeightsConfig,
        "Download a backbone's ImageNet weights (needs the internet) and write them to one file, "
        "to copy to machines without internet and pass as --weights PATH.",
        run="fetch_weights",
    ),
    "samples": Command(
        SamplesConfig,
        "Write held-out test images of a trained model, with the label its evaluation gave "
        "each (labels.csv), to try the service or the CLI on.",
        run="samples",
    ),
    "faithfulness": Command(
        FaithfulnessConfig,
        "The deletion test of a model's class activation map on its held-out test split: "
        "deleting the pixels the map ranks highest must lower the predicted class's "
        "probability more than deleting random ones, on at least 80% of the images; a shuffled "
        "map and the second class's map are measured beside it. Exit status 1 when the map "
        "fails.",
        run="faithfulness",
    ),
    "captured": Command(
        CapturedConfig,
        "Turn the service's capture store (CAPTURE_DIR) into training data: inputs with a "
        "feedback label into class folders for --data, the others into a queue folder ranked "
        "by how much a label would teach (queue.csv).",
        run="captured",
    ),
    "monitor": Command(
        MonitorConfig,
        "Live accuracy from the prediction log that every replica writes (DATABASE_URL): the "
        "accuracy, the confusion matrix and the calibration (ECE) of the labelled predictions, "
        "the label coverage, and the labels still pending or orphaned.",
        run="monitor",
    ),
    "rollout": Command(
        RolloutConfig,
        "Should the challenger in the shadow (the service's SHADOW_MODEL) replace the served "
        "model? Its agreement and unknown rate on every shadowed input, both models' accuracy on "
        "the labelled ones, and a sequential test of the paired outcomes that may be checked "
        "after every label: promote, keep watching or reject; with --promote, a promoted "
        "challenger becomes latest and the replicas swap to it.",
        run="rollout",
    ),
    "drift": Command(
        DriftConfig,
        "Has what the model sees moved away from its validation split? Tests the prediction log "
        "(or a folder of images) window by window against the reference the training run "
        "shipped with the model (drift_reference.npz): the top-1 score (per-class scores over "
        "a folder), the unknown-input score and the predicted classes' shares; estimates the "
        "accuracy without labels (ATC, mean confidence) beside the live accuracy where labels "
        "came back; prints a report and writes plots and drift.json.",
        run="drift",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI of ``command``, derived from its config class."""
    config_class, description, _ = COMMANDS[command]
    prog = "python -m training" + (f" {command}" if command else "")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_options(parser, config_class)
    return parser


def parse(argv: list[str] | None = None) -> tuple[str | None, argparse.Namespace]:
    """``(command, its parsed arguments)``; ``--help`` and a usage error exit here, before the
    job's modules load (see :mod:`training.__main__`)."""
    argv = sys.argv[1:] if argv is None else argv
    subcommand = argv[0] if argv and argv[0] in COMMANDS else None
    return subcommand, build_parser(subcommand).parse_args(argv[1:] if subcommand else argv)
