"""Stand-in backbone weights for tests and benchmarks, where ImageNet's cannot be downloaded."""

from __future__ import annotations

from pathlib import Path

import keras

from training.backbones import BACKBONES


def write_stand_in_weights(backbone: str, images, path: Path) -> Path:
    """A weights file for ``--weights PATH`` where ImageNet's cannot be had (tests, benchmarks):
    random weights whose BatchNormalization statistics are set from ``images`` (raw 0-255,
    ``(N, H, W, 3)``). Freshly initialised statistics leave the pooled features near 1e-11, so
    every image would look alike; measured ones keep each layer's output at unit scale, as
    trained weights do.
    """
    base = BACKBONES[backbone].create(tuple(images.shape[1:]), None)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0  # one pass sets the moving statistics to this batch's
    base(keras.ops.convert_to_tensor(images, dtype="float32"), training=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(path)
    return path
