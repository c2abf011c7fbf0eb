"""Running one parsed command of the training job (:mod:`training.cli` parses it): the job's
modules, which load TensorFlow and Keras, and the one place where their errors become an exit
status and a line on stderr."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from service.core.classifier import ModelLoadError
from service.core.options import config_from_args
from training import artifacts
from training.audit.job import AuditFailed, run_audit_command
from training.backbones import WeightsError, fetch_weights
from training.captured import export_captured
from training.checkpoints import TrainingStopped, backup_dir
from training.cli import COMMANDS
from training.compare import ModelRefused
from training.config import ConfigError
from training.export import ExportError
from training.faithfulness import FaithfulnessError, format_table, run_faithfulness
from training.monitor import format_report, live_figures
from training.publish import PublishError
from training.reexport import run_export
from training.samples import write_samples
from training.sources import DataError
from training.train import run_training

EXIT_USAGE = 2
EXIT_REFUSED = 3  # --compare-with found the new model worse
EXIT_UNFAITHFUL = 1  # faithfulness: the map failed the deletion test


def configure_runtime() -> None:
    """Process-wide set-up, done here rather than at import time."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(subcommand: str | None, args: argparse.Namespace) -> int:
    """Run ``subcommand`` (None: train) with its parsed arguments; the exit status."""
    try:
        config = config_from_args(args, COMMANDS[subcommand][0])
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
        elif subcommand == "monitor":
            figures = live_figures(config)
            print(format_report(figures))
            if config.output:
                artifacts.write_json(config.output, figures)
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
