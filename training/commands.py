"""Running one parsed command of the training job (:mod:`training.cli` parses it): the job's
modules, which load TensorFlow and Keras, and the one place where their errors become an exit
status and a line on stderr."""

from __future__ import annotations

import argparse
import logging
import sys

from service.core.classifier import ModelLoadError
from service.core.options import config_from_args
from training import artifacts
from training.audit.job import AuditFailed, run_audit_command
from training.cli import COMMANDS, ExitCode
from training.config import ConfigError
from training.data.captured import export_captured
from training.data.samples import write_samples
from training.data.sources import DataError
from training.export.convert import ExportError
from training.export.publish import PublishError
from training.export.reexport import run_export
from training.fit.checkpoints import TrainingStopped, backup_dir
from training.model.backbones import WeightsError
from training.model.backbones import fetch_weights as fetch_backbone_weights
from training.quality.compare import ModelRefused
from training.quality.drift_report import format_drift, run_drift
from training.quality.faithfulness import FaithfulnessError, format_table, run_faithfulness
from training.quality.monitor import format_report, live_figures
from training.quality.rollout import format_rollout, run_rollout
from training.quality.sequential import REJECT
from training.train import run_training

# Each error the job's modules raise for a cause the user can act on, and its exit status.
EXIT_ON = (
    (ConfigError, ExitCode.USAGE),
    ((AuditFailed, DataError), ExitCode.DATA),
    ((ExportError, ModelLoadError, FaithfulnessError, PublishError), ExitCode.MODEL),
    (FileNotFoundError, ExitCode.MODEL),  # an artifact folder or file that is not there
    (WeightsError, ExitCode.WEIGHTS),
)


def configure_runtime() -> None:
    """Process-wide set-up, done here rather than at import time."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "absl", "tf2onnx", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(config) -> None:
    run_training(config)


def export(config) -> None:
    run_export(config)


def fetch_weights(config) -> None:
    print(f"wrote {fetch_backbone_weights(config.backbone, config.output)}")


def audit(config) -> None:
    run_audit_command(config)


def samples(config) -> None:
    print(f"wrote {write_samples(config.artifact, config.output, config.count)}")


def captured(config) -> None:
    print(export_captured(config))


def monitor(config) -> None:
    figures = live_figures(config)
    print(format_report(figures))
    if config.output:
        artifacts.write_json(config.output, figures)


def rollout(config) -> int:
    figures = run_rollout(config)
    print(format_rollout(figures))
    if config.output:
        artifacts.write_json(config.output, figures)
    return ExitCode.REJECTED if figures["decision"] == REJECT else ExitCode.OK


def drift(config) -> None:
    print(format_drift(run_drift(config)))


def faithfulness(config) -> int:
    figures = run_faithfulness(config.artifact, config.images, config.seed)
    print(format_table(figures))
    if config.output:
        artifacts.write_json(config.output, figures)
    return ExitCode.OK if figures["passed"] else ExitCode.UNFAITHFUL


def run_command(subcommand: str | None, args: argparse.Namespace) -> int:
    """Run ``subcommand`` (None: train) with its parsed arguments; the exit status."""
    command = COMMANDS[subcommand]
    config = None
    try:
        config = config_from_args(args, command.config)
        configure_runtime()
        # A runner returns its exit status when it has one of its own; None is success.
        return int(globals()[command.run](config) or ExitCode.OK)
    except ModelRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except KeyboardInterrupt:
        print("interrupted: no new version was written", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except TrainingStopped as exc:
        print(
            f"stopped by {exc}: the state of the last completed epoch is saved in "
            f"{backup_dir(config)}; run again with --resume to continue",
            file=sys.stderr,
        )
        return ExitCode.STOPPED
    except Exception as exc:
        for errors, code in EXIT_ON:
            if isinstance(exc, errors):
                print(f"error: {exc}", file=sys.stderr)
                return code
        raise
