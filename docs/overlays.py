"""The README's two class activation map overlays, one right answer and one wrong, from a trained
model's held-out test split, drawn by the service's own code (``service.core.explain``).

python -m docs.overlays --model artifacts/animals/latest   # writes docs/images/cam-*.png

Each figure is the test image and the same image with the map of the model's top class laid
over it, side by side, scaled up (the built-in images are 28x28) to ``--size`` pixels a side.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from service.core import explain
from service.core.classifier import ModelSource, load_classifier

IMAGES = Path(__file__).resolve().parent / "images"


def figure(pixels: np.ndarray, cam: np.ndarray, size: int) -> Image.Image:
    """The image and its overlay side by side, each ``size`` pixels a side."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")
    enlarged = image.resize((size, size), Image.Resampling.NEAREST)
    both = Image.new("RGB", (2 * size + 8, size), (255, 255, 255))
    both.paste(enlarged, (0, 0))
    both.paste(explain.overlay(enlarged, cam), (size + 8, 0))
    return both


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docs.overlays", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("artifacts/animals/latest"))
    parser.add_argument("--output", type=Path, default=IMAGES)
    parser.add_argument("--size", type=int, default=196)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training import artifacts
    from training.config import TrainConfig
    from training.data.pipelines import load_model_inputs
    from training.data.prepare import prepare_data

    folder = artifacts.resolve_artifact(args.model)
    classifier = load_classifier(ModelSource(folder, str(folder)))
    data = prepare_data(
        TrainConfig.from_dict(artifacts.read_json(folder / "metadata.json")["config"])
    )
    test = data.splits.test
    inputs = load_model_inputs(data.images, test, data.spec)
    outputs = classifier.predict(inputs)
    answers = classifier.answers(classifier.postprocess(outputs), 2).to_dicts()
    truth = [data.class_names[label] for label in data.labels[test]]
    # The first confident right answer, and the first wrong one, in the split's order.
    right = next(i for i, a in enumerate(answers) if a["label"] == truth[i] and a["score"] > 0.9)
    wrong = next(i for i, a in enumerate(answers) if a["top_k"][0]["label"] != truth[i])
    args.output.mkdir(parents=True, exist_ok=True)
    for name, position in (("right", right), ("wrong", wrong)):
        path = args.output / f"cam-{name}.png"
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        figure(inputs[position], outputs.cams[position], args.size).save(path, optimize=True)
        first, second = answers[position]["top_k"]
        print(
            f"{shown}: a {truth[position]} of the test split, answered {first['label']} "
            f"{first['score']:.2f} (then {second['label']} {second['score']:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
