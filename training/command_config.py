"""The configs of the training job's other commands (``python -m training <command>``): export,
samples, captured, monitor, rollout, drift, fetch-weights, audit and faithfulness. Each derives its
command's options, as :class:`training.config.TrainConfig` does the training's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.core.options import option as _option
from training.config import BACKBONE_CHOICES, PRECISION_OF_QUANTIZE, ConfigError


@dataclass(frozen=True)
class ExportConfig:
    """Re-export an existing artifact folder to ONNX, check it, and publish it."""

    artifact: Path = _option(
        Path("artifacts/animals/latest"), "artifact folder written by a training run"
    )
    quantize: str | None = _option(
        None,
        "none or int8 (see training's --quantize); default: as the artifact was exported",
        choices=tuple(PRECISION_OF_QUANTIZE),
    )
    publish: bool = _option(True, "import the checked model into the BentoML model store")

    @property
    def precision(self) -> str | None:
        """The precision asked for, or None to keep the artifact's."""
        return None if self.quantize is None else PRECISION_OF_QUANTIZE[self.quantize]


@dataclass(frozen=True)
class SamplesConfig:
    """Write held-out test images of a trained model to files, to try the service on."""

    artifact: Path = _option(
        Path("artifacts/animals/latest"), "artifact folder written by a training run"
    )
    output: Path = _option(Path("samples"), "folder to write the images and labels.csv into")
    count: int = _option(20, "how many held-out test images to write")


@dataclass(frozen=True)
class CapturedConfig:
    """Turn the service's capture store into a training folder and a labelling queue."""

    store: Path = _option(Path("captured"), "the service's CAPTURE_DIR")
    output: Path = _option(
        Path("captured-data"),
        "the folder to write: one sub-folder per feedback label (what --data takes)",
    )
    queue: Path | None = _option(
        None,
        "the folder for the unlabelled inputs, ranked, with queue.csv (default: <output>-queue)",
    )
    database: str = _option(
        "",
        "the prediction log's DATABASE_URL: take the labels from it, as every replica stored "
        "them (default: the store's labels/ files)",
    )


@dataclass(frozen=True)
class MonitorConfig:
    """Live accuracy from the prediction log that every replica writes."""

    database: str = _option(
        "",
        "the service's DATABASE_URL (postgresql://...), or sqlite:///<FEEDBACK_DIR>/"
        "predictions.sqlite3 (default: $DATABASE_URL)",
    )
    since: str = _option("7d", "the predictions of this last period: a number and s, m, h or d")
    model_version: str = _option("", "only the predictions of this model version (default: all)")
    output: Path | None = _option(None, "also write the figures to this JSON file")


@dataclass(frozen=True)
class RolloutConfig:
    """Should the challenger in the shadow (SHADOW_MODEL) replace the served model?"""

    database: str = _option(
        "", "the service's DATABASE_URL, as for monitor (default: $DATABASE_URL)"
    )
    challenger: str = _option("", "the challenger's version (default: the one shadowed last)")
    since: str = _option("30d", "the shadowed predictions of this last period")
    alpha: float = _option(
        0.05,
        "the level: the most the sequential test may promote a challenger that is no better "
        "(it may be checked after every label)",
    )
    min_agreement: float = _option(
        0.5, "guard rail: reject a challenger that agrees with the served model less often"
    )
    max_unknown: float = _option(
        0.3, "guard rail: reject a challenger that answers unknown more often than this"
    )
    min_shadowed: int = _option(
        100, "shadowed inputs the guard rails need before a promotion (or a rejection by them)"
    )
    promote: Path | None = _option(
        None,
        "on a promotion, make the challenger latest in this model folder (e.g. "
        "artifacts/animals); every replica watching it swaps",
    )
    output: Path | None = _option(None, "also write the figures to this JSON file")

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha {self.alpha}: use a level between 0 and 1, e.g. 0.05")
        for name in ("min_agreement", "max_unknown"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')}: use a share from 0 to 1")


@dataclass(frozen=True)
class DriftConfig:
    """Has what the model sees moved away from its validation split? A report to read."""

    artifact: Path = _option(
        Path("artifacts/animals/latest"),
        "the model's artifact folder (its drift_reference.npz, metadata.json and model.onnx)",
    )
    database: str = _option(
        "", "the prediction log to test, as for monitor (default: $DATABASE_URL)"
    )
    folder: Path | None = _option(
        None,
        "test a folder of images instead of the log: read recursively, in sorted order, and "
        "classified with the artifact's model.onnx; images in a sub-folder named after a class "
        "count as labelled with it (default: none)",
    )
    since: str = _option("7d", "the predictions of this last period: a number and s, m, h or d")
    model_version: str = _option(
        "", "only the logged predictions of this model version (default: the artifact's version)"
    )
    window: int = _option(200, "images per window, tested one window after another")
    alpha: float = _option(
        0.05, "the level: the most often a window like the validation split is called drifted"
    )
    output: Path = _option(
        Path("drift-report"), "folder for drift_score.png, distributions.png and drift.json"
    )

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha {self.alpha}: use a level between 0 and 1, e.g. 0.05")
        if self.window < 10:
            raise ConfigError(f"--window {self.window}: use at least 10 images, e.g. 200")


@dataclass(frozen=True)
class FetchWeightsConfig:
    """Download a backbone's ImageNet weights once, into a file for ``--weights PATH``."""

    backbone: str = _option("mobilenet_v3_small", "the backbone", choices=BACKBONE_CHOICES[1:])
    output: Path | None = _option(
        None, "the weights file to write (default: weights/<backbone>.weights.h5)"
    )


@dataclass(frozen=True)
class AuditConfig:
    """Audit labelled images: duplicates, likely label errors, odd and unreadable files."""

    data: str = _option(
        "animals",
        "'animals' (the built-in set), a folder with one sub-folder per class, or keras:<name> "
        "(as training's --data)",
    )
    output: Path = _option(
        Path("audit"), "folder that receives report.md, report.json and the rest"
    )
    classes: tuple[str, ...] = _option((), "comma-separated class names to audit (default: all)")
    max_per_class: int | None = _option(
        None, "audit at most this many images of each class (default: all)"
    )
    label_issues: bool = _option(
        True,
        "look for likely label errors and unknown-looking images (trains K quick models or "
        "reads backbone embeddings); --no-label-issues does the file, duplicate and balance "
        "checks alone",
    )
    backbone: str = _option(
        "cnn",
        "where the out-of-fold probabilities come from: cnn (a quick compact CNN trained per "
        "fold) or a pretrained backbone's embeddings with logistic regression per fold",
        choices=BACKBONE_CHOICES,
    )
    weights: str = _option("imagenet", "backbone weights, as training's --weights")
    image_size: int | None = _option(
        None, "side of the quick model's input (default: the images' median side; at most 64)"
    )
    folds: int = _option(4, "folds of the out-of-fold predictions")
    epochs: int = _option(5, "epochs of each quick model")
    seed: int = _option(42, "seed of the folds and the quick models")

    def __post_init__(self) -> None:
        if self.folds < 2 or self.epochs < 1:
            raise ConfigError("--folds must be at least 2 and --epochs at least 1")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """Measure how faithful a model's class activation map is: the deletion test."""

    artifact: Path = _option(
        Path("artifacts/animals/latest"), "artifact folder written by a training run"
    )
    images: int | None = _option(
        None, "test at most this many held-out test images, spread over the split (default: all)"
    )
    seed: int = _option(0, "seed of the random deletion orders and of the shuffled maps")
    output: Path | None = _option(None, "also write the figures to this JSON file")
