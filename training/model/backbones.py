"""Pretrained backbones from ``keras.applications``: the classifier built on one, its weights
(ImageNet, a local file, or none), and which of its layers fine-tuning unfreezes.

Every backbone keeps its own input scaling inside the graph (``include_preprocessing`` and the
like), so the model, and ``model.onnx``, still take raw 0-255 pixels, as the from-scratch CNN does.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras

from service.core.contract import INPUT_NAME, OUTPUT_NAME
from service.core.preprocessing import ImageSpec
from training.config import BACKBONE_IMAGE_SIZE

# A download that has not answered in this long is taken as no internet.
DOWNLOAD_TIMEOUT_SECONDS = 15
HEAD_DROPOUT = 0.2


class WeightsError(Exception):
    """Backbone weights could not be had: the message says which and how to provide them."""


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` constructor and what it brings."""

    build: Callable[..., keras.Model]
    # Keyword arguments that put the backbone's own input scaling inside the graph.
    scaling: dict

    def create(self, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
        """The backbone without its ImageNet classifier: ``(B, H, W, 3)`` raw 0-255 pixels ->
        ``(B, D)`` globally average-pooled features."""
        return self.build(
            include_top=False,
            weights=weights,
            input_shape=input_shape,
            pooling="avg",
            **self.scaling,
        )


BACKBONES = {
    # Rescaling to [-1, 1] as the first layer.
    "mobilenet_v3_small": Backbone(
        keras.applications.MobileNetV3Small, {"include_preprocessing": True}
    ),
    "mobilenet_v3_large": Backbone(
        keras.applications.MobileNetV3Large, {"include_preprocessing": True}
    ),
    # EfficientNet always scales and normalises its 0-255 input in its first layers.
    "efficientnet_b0": Backbone(keras.applications.EfficientNetB0, {}),
}


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation (Keras downloads through urllib): an unreachable host ends
    in ``seconds`` instead of the system's connect timeout of minutes."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_backbone(backbone: str) -> keras.Model:
    """The backbone at 224x224 with its ImageNet weights, downloaded into Keras's cache unless
    they are there already.

    Raises:
        WeightsError: the download failed (no internet, or no answer in 15 s).
    """
    try:
        with _download_timeout(DOWNLOAD_TIMEOUT_SECONDS):
            return BACKBONES[backbone].create(
                (BACKBONE_IMAGE_SIZE, BACKBONE_IMAGE_SIZE, 3), "imagenet"
            )
    except Exception as exc:  # Keras raises a bare Exception for a failed fetch
        reason = str(exc).split(" -- ")[-1].strip() or type(exc).__name__
        raise WeightsError(
            f"the ImageNet weights of {backbone} could not be downloaded ({reason}); without "
            "internet, fetch them once where there is ('python -m training fetch-weights "
            f"--backbone {backbone}') and pass the file with --weights PATH"
        ) from None


def resolve_weights(backbone: str, weights: str) -> str | None:
    """What ``keras.applications`` takes for ``--weights``: "imagenet" (made sure of now, so that
    a machine without internet fails here, before the data is read), a checked local file, or
    None.

    Raises:
        WeightsError: the download failed, or the file is missing.
    """
    if weights == "none":
        return None
    if weights == "imagenet":
        imagenet_backbone(backbone)
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"--weights {weights}: no such file; pass 'imagenet', 'none' or the path of a weights "
            f"file made by 'python -m training fetch-weights --backbone {backbone}'"
        )
    return str(path)


def _head(features, num_classes: int):
    """Dropout, then the ``logits`` layer: the classifier's head, in the full model and alone."""
    x = keras.layers.Dropout(HEAD_DROPOUT, name="dropout")(features)
    return keras.layers.Dense(num_classes, name=OUTPUT_NAME)(x)


def build_backbone_model(
    backbone: str, spec: ImageSpec, num_classes: int, weights: str | None
) -> keras.Model:
    """The classifier on a pretrained backbone: raw 0-255 pixels ``(B, H, W, C)`` -> (greyscale
    replicated to three channels) -> the backbone's own scaling and layers -> pooled features ->
    dropout -> ``(B, num_classes)`` logits. The backbone is a nested model named ``backbone``.

    Raises:
        WeightsError: ``weights`` is a file that does not fit this backbone.
    """
    inputs = keras.Input(shape=spec.shape, dtype="float32", name=INPUT_NAME)
    x = inputs
    if spec.channels == 1:
        # ImageNet backbones take colour: the grey channel becomes R, G and B, in the graph.
        x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    try:
        base = BACKBONES[backbone].create((spec.height, spec.width, 3), weights)
    except ValueError as exc:
        raise WeightsError(
            f"--weights {weights} does not fit {backbone} ({str(exc).splitlines()[0][:200]}); "
            f"make the file with 'python -m training fetch-weights --backbone {backbone}'"
        ) from None
    base.name = "backbone"
    return keras.Model(inputs, _head(base(x), num_classes), name=f"{backbone}_classifier")


def build_head(feature_size: int, num_classes: int) -> keras.Model:
    """The head alone, trained on cached backbone features in phase 1; its layers are named as
    the full model's, so their weights are copied over by name."""
    features = keras.Input(shape=(feature_size,), dtype="float32", name="features")
    return keras.Model(features, _head(features, num_classes), name="head")


def copy_head(head: keras.Model, model: keras.Model) -> None:
    model.get_layer(OUTPUT_NAME).set_weights(head.get_layer(OUTPUT_NAME).get_weights())


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: nothing of the backbone trains."""
    model.get_layer("backbone").trainable = False


def unfreeze_top(model: keras.Model, layers: int) -> int:
    """Phase 2: unfreeze the top ``layers`` layers of the backbone, except BatchNormalization,
    which stays frozen, so it keeps normalising with its pretrained statistics (Keras then runs it
    in inference mode: updating them on small batches of new data would wreck what was learnt).

    Returns:
        How many weight tensors became trainable.
    """
    base = model.get_layer("backbone")
    base.trainable = True
    cut = max(0, len(base.layers) - layers)
    for position, layer in enumerate(base.layers):
        frozen = position < cut or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
    return len(model.trainable_weights)


def fetch_weights(backbone: str, output: Path | None = None) -> Path:
    """Download ``backbone``'s ImageNet weights and write them to ``output`` (default
    ``weights/<backbone>.weights.h5``), atomically; that file is what ``--weights PATH`` takes.

    Raises:
        WeightsError: the download failed.
    """
    path = Path(output or Path("weights") / f"{backbone}.weights.h5")
    if not path.name.endswith(".weights.h5"):
        raise WeightsError(
            f"{path}: the file name must end in .weights.h5 (Keras's weights format)"
        )
    model = imagenet_backbone(backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name[: -len('.weights.h5')]}.partial.weights.h5")
    model.save_weights(partial)
    partial.replace(path)
    return path
