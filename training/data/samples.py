"""Write held-out test images to files, with the label the training job's evaluation gave each,
so the service and the CLI can be tried (and checked) on images the model never trained on."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from training import artifacts
from training.config import TrainConfig
from training.data.pipelines import load_model_inputs
from training.data.prepare import prepare_data


def write_samples(artifact: Path, output: Path, count: int) -> Path:
    """Write up to ``count`` held-out test images of ``artifact`` into ``output``.

    Returns:
        The path of ``labels.csv``: file, true label, and the label the evaluated Keras model gave.
    """
    folder = artifacts.resolve_artifact(artifact)
    metadata = artifacts.read_json(folder / "metadata.json")
    data = prepare_data(TrainConfig.from_dict(metadata["config"]))
    # Evenly spread over the test split, which is in source order (often grouped by class).
    spread = np.linspace(0, len(data.splits.test) - 1, min(count, len(data.splits.test)))
    chosen = data.splits.test[spread.astype(int)]
    inputs = load_model_inputs(data.images, chosen, data.spec)
    model = keras.saving.load_model(folder / "model.keras")
    predicted = np.argmax(model.predict(inputs.astype(np.float32), verbose=0), axis=-1)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for position, index in enumerate(chosen):
        true_label = data.class_names[data.labels[index]]
        if data.images.paths is not None:  # a folder source: the original file, as a user has it
            source = Path(data.images.paths[index])
            name = f"{position:04d}_{true_label}{source.suffix.lower()}"
            shutil.copyfile(source, output / name)
        else:
            name = f"{position:04d}_{true_label}.png"
            buffer = io.BytesIO()
            Image.fromarray(data.images.pixels[index]).save(buffer, format="PNG")
            (output / name).write_bytes(buffer.getvalue())
        rows.append([name, true_label, data.class_names[predicted[position]]])
    labels_file = output / "labels.csv"
    with labels_file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "true_label", "evaluated_label"])
        writer.writerows(rows)
    return labels_file
