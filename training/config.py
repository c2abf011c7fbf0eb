"""The training job's typed configuration, from which its command line is derived (the other
commands' configs are :mod:`training.command_config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from service.core.options import option as _option
from service.core.preprocessing import PIL_MODES, RESIZE_METHODS

AUDIT_MODES = ("warn", "fail", "off")
# The --backbone choices: the from-scratch CNN, then the keras.applications backbones of
# training.model.backbones.BACKBONES (spelled here too, because that module needs Keras to
# import; a test keeps the two equal).
BACKBONE_CHOICES = ("cnn", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
# Input side of a pretrained backbone: the side its ImageNet weights were trained at (the data
# preparation chooses the input size with it, the backbones build on it).
BACKBONE_IMAGE_SIZE = 224
# The precision of the shipped model.onnx for each --quantize choice.
PRECISION_OF_QUANTIZE = {"none": "float32", "int8": "int8"}
LR_SCHEDULES = ("plateau", "cosine", "one-cycle")
# How sure the unknown-input threshold is to accept --ood-acceptance of new images like the
# training data (training.quality.detector.threshold_for).
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
    epochs: int = _option(20, "passes over the training set (early stopping may end sooner)")
    batch_size: int = _option(32, "images per gradient-descent step (one iteration)")
    optimizer: str = _option(
        "adam",
        "gradient-descent variant (adamw: Adam with decoupled --weight-decay)",
        choices=("adam", "adamw", "sgd"),
    )
    learning_rate: float = _option(
        3e-3, "step size of each weight update: the peak of --lr-schedule's curve"
    )
    lr_schedule: str = _option(
        "one-cycle",
        "how the learning rate moves: plateau (halved when the validation loss stalls for 2 "
        "epochs), cosine (cosine decay to 0 over --epochs, after one epoch of warm-up), "
        "one-cycle (linear warm-up over the first 30% of --epochs, then cosine decay to 0)",
        choices=LR_SCHEDULES,
    )
    weight_decay: float = _option(
        1e-4, "decoupled weight decay of --optimizer adamw (ignored by adam and sgd)"
    )
    momentum: float = _option(0.9, "momentum of --optimizer sgd (0 for plain gradient descent)")
    loss: str = _option(
        "categorical_crossentropy",
        "loss between one-hot labels and predictions (mse is computed on softmax outputs)",
        choices=("categorical_crossentropy", "mse"),
    )
    label_smoothing: float = _option(
        0.0,
        "share of each one-hot target spread evenly over the classes (categorical_crossentropy "
        "only; 0 trains on hard labels)",
    )
    validation_split: float = _option(0.1, "fraction of all images held out for validation")
    test_split: float = _option(0.2, "fraction of all images held out for the final test")
    augment: bool = _option(
        True, "random shifts, zooms and rotations (and flips with --flip) of training images"
    )
    shift: float = _option(0.05, "largest random shift, as a fraction of the image side")
    zoom: float = _option(0.05, "largest random zoom in or out, as a fraction of the image side")
    rotation: float = _option(0.0, "largest random rotation in degrees (0: none)")
    flip: bool = _option(
        False,
        "random left-right flips: only for classes whose mirror image is the same class "
        "(animals, objects; not digits or letters)",
    )
    width: int = _option(
        32, "filters of the CNN's first convolution block (each later block doubles them)"
    )
    blocks: int | None = _option(
        None,
        "convolution blocks of the CNN, each halving the image (default: until 4 pixels or "
        "fewer remain, 2 to 5: 3 for 28x28)",
    )
    early_stopping_patience: int = _option(
        6,
        "epochs without val_loss improvement before stopping; the best weights are restored "
        "(0 disables early stopping)",
    )
    seed: int = _option(42, "seed for splits, shuffling and weight initialisation")
    deterministic: bool = _option(
        False,
        "make every TensorFlow op deterministic, so that the same data, options and seed give "
        "the same model on the same machine (tf.config.experimental.enable_op_determinism)",
    )
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
    audit: str = _option(
        "warn",
        "audit the data first (see 'python -m training audit'), report in the artifact's audit/: "
        "warn reports; fail also stops on duplicates filed under different labels or unreadable "
        "files; off skips it (and splits without regard to duplicates)",
        choices=AUDIT_MODES,
    )
    drop_duplicates: bool = _option(
        False, "keep one image of each group of exact or near duplicates the audit finds"
    )
    exclude_suspected_labels: float = _option(
        0.0,
        "leave this fraction of the training and validation images out: those the audit ranks "
        "most likely mislabelled (e.g. 0.05; the test split is kept whole)",
    )
    export: bool = _option(True, "export to ONNX and run the parity gate after training")
    quantize: str = _option(
        "none",
        "int8: ship onnxruntime's static int8 quantization of the exported model, calibrated on "
        "training images; refused if it loses more than 0.5 points of test accuracy",
        choices=tuple(PRECISION_OF_QUANTIZE),
    )
    publish: bool = _option(True, "import the exported model into the BentoML model store")
    latest: bool = _option(
        True,
        "make the new version latest (and publish it); --no-latest writes a challenger beside "
        "the served model, neither latest nor published: for the service's SHADOW_MODEL and "
        "'python -m training rollout'",
    )
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
        if self.weight_decay < 0:
            problems.append("--weight-decay must be 0 or more")
        if not 0 <= self.label_smoothing < 1:
            problems.append("--label-smoothing must be in [0, 1), e.g. 0.1")
        if not (0 <= self.shift < 0.5 and 0 <= self.zoom < 0.5 and 0 <= self.rotation <= 180):
            problems.append("--shift and --zoom must be in [0, 0.5), --rotation in [0, 180]")
        if not 4 <= self.width <= 256:
            problems.append("--width must be between 4 and 256")
        if self.blocks is not None and not 1 <= self.blocks <= 6:
            problems.append("--blocks must be between 1 and 6")
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
        problems += self._audit_problems()
        if not self.name or "/" in self.name or self.name.startswith("."):
            problems.append("--name must be a plain name, e.g. animals")
        if problems:
            raise ConfigError("; ".join(problems))

    def _audit_problems(self) -> list[str]:
        problems = []
        if not 0 <= self.exclude_suspected_labels < 0.5:
            problems.append("--exclude-suspected-labels must be in [0, 0.5), e.g. 0.05")
        if self.audit == "off" and (self.drop_duplicates or self.exclude_suspected_labels):
            problems.append(
                "--drop-duplicates and --exclude-suspected-labels act on the audit: not with "
                "--audit off"
            )
        return problems

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
        # Runs from before the audit split their data without regard to duplicates.
        values.setdefault("audit", "off")
        return cls(
            **{
                **values,
                "classes": tuple(values.get("classes", ())),
                "output": Path(values.get("output", "artifacts")),
            }
        )


class ConfigError(ValueError):
    """An option value that cannot work; the message says which and why."""
