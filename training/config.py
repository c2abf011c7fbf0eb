"""The training job's one typed configuration, and the command line derived from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from service.core.options import option as _option
from service.core.preprocessing import PIL_MODES, RESIZE_METHODS

# The --backbone choices: the from-scratch CNN, then the keras.applications backbones of
# training.backbones.BACKBONES (spelled here too, because that module needs Keras to import; a
# test keeps the two equal).
BACKBONE_CHOICES = ("cnn", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
# The precision of the shipped model.onnx for each --quantize choice.
PRECISION_OF_QUANTIZE = {"none": "float32", "int8": "int8"}
# How sure the unknown-input threshold is to accept --ood-acceptance of new images like the
# training data (training.ood.threshold_for).
THRESHOLD_CONFIDENCE = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on. Written whole into ``metadata.json``."""

    data: str = _option(
        "animals",
        "'animals' (the built-in Animal silhouettes set), a folder with one sub-folder per "
        "class (and an optional labels.txt), or keras:mnist | keras:fashion_mnist | "
        "keras:cifar10 (these download through keras.datasets, so they need the internet); "
        "several, comma-separated, train together (e.g. animals,captured: the original data "
        "and the folder 'python -m training captured' wrote)",
    )
    classes: tuple[str, ...] = _option(
        (), "comma-separated class names to keep, e.g. cat,dog (default: all)"
    )
    other: str | None = _option(
        None,
        "fold every class not in --classes into one class of this name, with balanced class "
        "weights (e.g. --classes cat,dog --other other)",
    )
    max_per_class: int | None = _option(
        None, "keep at most this many images of each source class, for quick runs (default: all)"
    )
    backbone: str = _option(
        "cnn",
        "the network: cnn (a compact CNN trained from scratch) or a keras.applications backbone, "
        "trained in two phases: a new head on the frozen backbone, then fine-tuning of its top "
        "layers",
        choices=BACKBONE_CHOICES,
    )
    weights: str = _option(
        "imagenet",
        "backbone weights: imagenet (downloaded once into Keras's cache: needs the internet), "
        "the path of a weights file (see 'python -m training fetch-weights'), or none (random)",
    )
    fine_tune_layers: int = _option(
        30,
        "top layers of the backbone unfrozen in phase 2 (BatchNormalization stays frozen); 0 "
        "trains the head only",
    )
    fine_tune_learning_rate: float = _option(1e-5, "learning rate of phase 2 (fine-tuning)")
    fine_tune_epochs: int | None = _option(
        None, "epochs of phase 2 (default: --epochs; early stopping may end sooner)"
    )
    image_size: int | None = _option(
        None,
        "side of the square model input in pixels (default: 224 with a backbone, else the data's "
        "own size, else 64)",
    )
    channels: int | None = _option(
        None,
        "1 (greyscale) or 3 (colour) (default: the data's own; a backbone replicates grey to "
        "three channels inside the model)",
        choices=tuple(PIL_MODES),
    )
    resize_method: str = _option(
        "bilinear",
        "how images are resized to the model input",
        choices=tuple(RESIZE_METHODS),
    )
    epochs: int = _option(30, "passes over the training set (early stopping may end sooner)")
    batch_size: int = _option(32, "images per gradient-descent step (one iteration)")
    optimizer: str = _option("adam", "gradient-descent variant", choices=("adam", "sgd"))
    learning_rate: float = _option(
        1e-3,
        "step size of each weight update (halved when the validation loss stalls for 2 epochs)",
    )
    momentum: float = _option(0.9, "momentum of --optimizer sgd (0 for plain gradient descent)")
    loss: str = _option(
        "categorical_crossentropy",
        "loss between one-hot labels and predictions (mse is computed on softmax outputs)",
        choices=("categorical_crossentropy", "mse"),
    )
    validation_split: float = _option(0.1, "fraction of all images held out for validation")
    test_split: float = _option(0.2, "fraction of all images held out for the final test")
    augment: bool = _option(True, "random small shifts and zooms of training images")
    early_stopping_patience: int = _option(
        6,
        "epochs without val_loss improvement before stopping; the best weights are restored "
        "(0 disables early stopping)",
    )
    seed: int = _option(42, "seed for splits, shuffling and weight initialisation")
    output: Path = _option(Path("artifacts"), "folder that receives <name>/<version>/")
    name: str = _option("animals", "model name: artifacts/<name>/ and the model-store tag")
    resume: bool = _option(
        False,
        "continue an interrupted run from its last completed epoch (its state is kept in "
        "<output>/<name>/.backup until the run completes)",
    )
    distribute: str = _option(
        "none",
        "tf.distribute strategy: mirrored (local devices) or multi-worker (TF_CONFIG; only the "
        "chief writes artifacts); --batch-size is then the global batch",
        choices=("none", "mirrored", "multi-worker"),
    )
    ood_acceptance: float = _option(
        0.95,
        "share of new images like the training data that the unknown-input detector must accept "
        f"(with {THRESHOLD_CONFIDENCE:.0%} confidence, judged on the validation split); it sets "
        "the score threshold above which the service answers 'unknown'",
    )
    export: bool = _option(True, "export to ONNX and run the parity gate after training")
    quantize: str = _option(
        "none",
        "int8: ship onnxruntime's static int8 quantization of the exported model, calibrated on "
        "training images; refused if it loses more than 0.5 points of test accuracy",
        choices=tuple(PRECISION_OF_QUANTIZE),
    )
    publish: bool = _option(True, "import the exported model into the BentoML model store")
    compare_with: str | None = _option(
        None,
        "the model this one would replace (an artifact folder or a model-store tag): both are "
        "evaluated on the same held-out images, and this one becomes latest and is published "
        "only if McNemar's test does not find it worse (one-sided, 5%) on the original test "
        "split nor on the held-out images of the other --data sources; a refused model is kept "
        "as an artifact",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append("--epochs must be at least 1")
        if self.batch_size < 1:
            problems.append("--batch-size must be at least 1")
        if self.learning_rate <= 0:
            problems.append("--learning-rate must be positive")
        if not 0 <= self.validation_split < 1 or not 0 < self.test_split < 1:
            problems.append("--validation-split must be in [0, 1) and --test-split in (0, 1)")
        elif self.validation_split + self.test_split >= 0.9:
            problems.append("--validation-split + --test-split must leave at least 10% to train on")
        if not 0.5 <= self.ood_acceptance < 1:
            problems.append("--ood-acceptance must be in [0.5, 1), e.g. 0.95")
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            problems.append("--image-size must be between 8 and 512")
        if self.backbone != "cnn":
            if self.image_size is not None and self.image_size < 32:
                problems.append(f"--image-size must be at least 32 with --backbone {self.backbone}")
            if self.distribute != "none":
                problems.append("--distribute trains --backbone cnn only")
        if self.fine_tune_layers < 0:
            problems.append("--fine-tune-layers must be 0 or more")
        if self.fine_tune_learning_rate <= 0:
            problems.append("--fine-tune-learning-rate must be positive")
        if self.fine_tune_epochs is not None and self.fine_tune_epochs < 1:
            problems.append("--fine-tune-epochs must be at least 1 (--fine-tune-layers 0 skips it)")
        if self.max_per_class is not None and self.max_per_class < 2:
            problems.append("--max-per-class must be at least 2")
        if self.other is not None and not self.classes:
            problems.append("--other needs --classes: it names the class everything else becomes")
        if self.other is not None and self.other in self.classes:
            problems.append(f"--other {self.other!r} is also listed in --classes")
        if self.compare_with and not self.export:
            problems.append("--compare-with needs the export (the models are compared in ONNX)")
        if not self.name or "/" in self.name or self.name.startswith("."):
            problems.append("--name must be a plain name, e.g. animals")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def uses_backbone(self) -> bool:
        return self.backbone != "cnn"

    @property
    def precision(self) -> str:
        """The precision of the shipped model: float32, or int8 with ``--quantize int8``."""
        return PRECISION_OF_QUANTIZE[self.quantize]

    @property
    def phase_2_epochs(self) -> int:
        """Fine-tuning epochs: none for the CNN or with ``--fine-tune-layers 0``."""
        if not self.uses_backbone or self.fine_tune_layers == 0:
            return 0
        return self.fine_tune_epochs or self.epochs

    def to_dict(self) -> dict:
        return {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict` (as read back from ``metadata.json``)."""
        known = {config_field.name for config_field in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        return cls(
            **{
                **values,
                "classes": tuple(values.get("classes", ())),
                "output": Path(values.get("output", "artifacts")),
            }
        )


class ConfigError(ValueError):
    """An option value that cannot work; the message says which and why."""


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


@dataclass(frozen=True)
class FetchWeightsConfig:
    """Download a backbone's ImageNet weights once, into a file for ``--weights PATH``."""

    backbone: str = _option("mobilenet_v3_small", "the backbone", choices=BACKBONE_CHOICES[1:])
    output: Path | None = _option(
        None, "the weights file to write (default: weights/<backbone>.weights.h5)"
    )


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
