"""Stand-in backbone weights for tests and benchmarks, where ImageNet's cannot be downloaded."""

from __future__ import annotations

from pathlib import Path

import keras

from training.model.backbones import BACKBONES


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


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.stand_in_weights``: a stand-in weights file made from a data set,
    for ``python -m training --weights PATH`` where ImageNet's cannot be downloaded."""
    import argparse
    import os

    import numpy as np

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stand_in_weights",
        description="Write stand-in backbone weights (random, with BatchNormalization statistics "
        "measured on images of --data) for --weights PATH, where ImageNet's cannot be had.",
    )
    parser.add_argument("--backbone", default="mobilenet_v3_small", choices=sorted(BACKBONES))
    parser.add_argument("--data", default="animals", help="what training's --data takes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64, help="images to measure on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="the .weights.h5 file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from service.core.preprocessing import ImageSpec
    from training.data.pipelines import load_model_inputs
    from training.data.sources import load_sources

    keras.utils.set_random_seed(args.seed)
    source = load_sources(args.data)
    chosen = np.linspace(0, len(source) - 1, min(args.images, len(source))).astype(int)
    spec = ImageSpec(args.image_size, args.image_size, source.channels)
    images = load_model_inputs(source, chosen, spec)
    if spec.channels == 1:  # as the classifier's grey_to_rgb layer does
        images = np.repeat(images, 3, axis=-1)
    print(f"wrote {write_stand_in_weights(args.backbone, images, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
