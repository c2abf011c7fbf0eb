"""The training job's command line: ``python -m training [options]`` trains (and by default
exports and publishes); ``export``, ``fetch-weights`` and ``samples`` are its other commands.
Each command's options are derived from its config class."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from service.core.classifier import ModelLoadError
from service.core.options import add_dataclass_options, config_from_args
from training import artifacts
from training.audit.job import AuditFailed, run_audit_command
from training.backbones import WeightsError, fetch_weights
from training.captured import export_captured
from training.checkpoints import TrainingStopped, backup_dir
from training.compare import ModelRefused
from training.config import (
    AuditConfig,
    CapturedConfig,
    ConfigError,
    ExportConfig,
    FaithfulnessConfig,
    FetchWeightsConfig,
    SamplesConfig,
    TrainConfig,
)
from training.export import ExportError
from training.faithfulness import FaithfulnessError, format_table, run_faithfulness
from training.publish import PublishError
from training.reexport import run_export
from training.samples import write_samples
from training.sources import DataError
from training.train import run_training

EXIT_USAGE = 2
EXIT_REFUSED = 3  # --compare-with found the new model worse
EXIT_UNFAITHFUL = 1  # faithfulness: the map failed the deletion test


# Each command: its config class and description; `python -m training` alone trains.
COMMANDS = {
    None: (
        TrainConfig,
        "Train an image classifier on labelled images, evaluate it on a held-out test split, "
        "export it to ONNX behind a parity gate and publish it to the BentoML model store. "
        "'python -m training export --help' re-exports an existing artifact; "
        "'python -m training samples --help' writes held-out test images to try it on; "
        "'python -m training audit --help' checks the data alone.",
    ),
    "audit": (
        AuditConfig,
        "Audit labelled images and write a report (report.md, report.json, relabel.csv, contact "
        "sheets): unreadable and odd files, exact and near duplicates (also under different "
        "labels), likely label errors (confident learning on out-of-fold probabilities), images "
        "that look like no class, class imbalance. The training job runs the same audit first.",
    ),
    "export": (
        ExportConfig,
        "Export an artifact folder's model.keras to model.onnx, check it against Keras (the "
        "parity gate) and publish it to the BentoML model store.",
    ),
    "fetch-weights": (
        FetchWeightsConfig,
        "Download a backbone's ImageNet weights (needs the internet) and write them to one file, "
        "to copy to machines without internet and pass as --weights PATH.",
    ),
    "samples": (
        SamplesConfig,
        "Write held-out test images of a trained model, with the label its evaluation gave "
        "each (labels.csv), to try the service or the CLI on.",
    ),
    "faithfulness": (
        FaithfulnessConfig,
        "The deletion test of a model's class activation map on its held-out test split: "
        "deleting the pixels the map ranks highest must lower the predicted class's "
        "probability more than deleting random ones, on at least 80% of the images; a shuffled "
        "map and the second class's map are measured beside it. Exit status 1 when the map "
        "fails.",
    ),
    "captured": (
        CapturedConfig,
        "Turn the service's capture store (CAPTURE_DIR) into training data: inputs with a "
        "feedback label into class folders for --data, the others into a queue folder ranked "
        "by how much a label would teach (queue.csv).",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI of ``command``, derived from its config class."""
    config_class, description = COMMANDS[command]
    prog = "python -m training" + (f" {command}" if command else "")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_options(parser, config_class)
    return parser


def configure_runtime() -> None:
    """Process-wide set-up, done here rather than at import time."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    subcommand = argv[0] if argv and argv[0] in COMMANDS else None
    config_class = COMMANDS[subcommand][0]
    args = build_parser(subcommand).parse_args(argv[1:] if subcommand else argv)
    try:
        config = config_from_args(args, config_class)
        configure_runtime()
        if subcommand == "export":
            run_export(config)
        elif subcommand == "fetch-weights":
            print(f"wrote {fetch_weights(config.backbone, config.output)}")
        elif subcommand == "audit":
            run_audit_command(config)
        elif subcommand == "samples":
            print(f"wrote {write_samples(config.artifact, config.output, config.count)}")
        elif subcommand == "captured":
            print(export_captured(config))
        elif subcommand == "faithfulness":
            figures = run_faithfulness(config.artifact, config.images, config.seed)
            print(format_table(figures))
            if config.output:
                artifacts.write_json(config.output, figures)
            if not figures["passed"]:
                return EXIT_UNFAITHFUL
        else:
            run_training(config)
    except (
        AuditFailed,
        ConfigError,
        DataError,
        ExportError,
        ModelLoadError,
        FaithfulnessError,
        PublishError,
        WeightsError,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModelRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted: no new version was written", file=sys.stderr)
        return 130
    except TrainingStopped as exc:
        print(
            f"stopped by {exc}: the state of the last completed epoch is saved in "
            f"{backup_dir(config)}; run again with --resume to continue",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
