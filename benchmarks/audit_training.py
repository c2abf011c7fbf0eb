"""What acting on the audit does to trained models (``python -m benchmarks.audit --part ...``).

leakage: 300 images a class of the built-in set (its own duplicates removed) with near copies
(resized, re-encoded) of 30% of them under the same label. Trained once with the old split
(``--audit off``: copies fall on both sides) and once with the audit's group-aware split; the
old split's test accuracy is compared with its accuracy on the test images that have no copy
among the training images, and with the group-aware split's.

exclusion: the built-in set with 10% of the labels flipped at random (in every split), trained
with and without ``--exclude-suspected-labels 0.1``; test accuracy against the true labels.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from training.config import TrainConfig
from training.data.pipelines import load_model_inputs
from training.data.prepare import prepare_data
from training.data.scan import scan_images
from training.data.sources import load_animals
from training.train import run_training

EPOCHS = 10
# How the leakage runs train: as the exclusion runs, and as a model that memorises its training
# images (no augmentation, no early stopping), where a copy in the test split shows most.
LEAKAGE_SETTINGS = {
    "10 epochs, augmented": {},
    "30 epochs, no augmentation": {"epochs": 30, "augment": False, "early_stopping_patience": 0},
}


def write_folder(folder: Path, pixels: np.ndarray, names: np.ndarray, files: list[str]) -> None:
    for name in set(names.tolist()):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, relative in enumerate(files):
        Image.fromarray(pixels[index]).save(folder / relative)


def train(folder: Path, output: Path, name: str, **options) -> tuple[Path, TrainConfig]:
    config = TrainConfig(data=str(folder), output=output, name=name, image_size=28, export=False,
                         publish=False, **({"epochs": EPOCHS} | options))  # fmt: skip
    return run_training(config), config


def test_predictions(config: TrainConfig, artifact: Path):
    """``(test indices, predicted class names, the prepared data)`` of a trained run."""
    data = prepare_data(config)
    model = keras.saving.load_model(artifact / "model.keras")
    inputs = load_model_inputs(data.images, data.splits.test, data.spec).astype(np.float32)
    predicted = np.asarray(model.predict(inputs, verbose=0, batch_size=256)).argmax(axis=1)
    return data.splits.test, np.asarray(data.class_names)[predicted], data


def leakage(workdir: Path, seed: int, deduplicated) -> dict:
    pixels, names, _ = deduplicated
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(names == n))[:300]
                           for n in np.unique(names)])  # fmt: skip
    pixels, names = pixels[keep], names[keep]
    folder = workdir / "leakage"
    write_folder(folder, pixels, names, [f"{n}/{i:05d}.png" for i, n in enumerate(names)])
    for index in rng.choice(len(names), int(0.3 * len(names)), replace=False):
        side = int(rng.integers(20, 57))
        image = Image.fromarray(pixels[index]).resize((side, side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(70, 95)))
        (folder / names[index] / f"copy-{index:05d}.jpg").write_bytes(buffer.getvalue())
    return {
        setting: {
            mode: leakage_run(folder, workdir, mode, setting, options) for mode in ("off", "warn")
        }
        for setting, options in LEAKAGE_SETTINGS.items()
    }


def leakage_run(folder: Path, workdir: Path, mode: str, setting: str, options: dict) -> dict:
    name = f"leak-{mode}-{options.get('epochs', EPOCHS)}"
    artifact, config = train(folder, workdir / "out", name, audit=mode, **options)
    test, predicted, data = test_predictions(config, artifact)
    correct = predicted == data.images.names[test]
    groups = scan_images(data.images).duplicates.group_ids(len(data.images))
    leaked = np.isin(groups[test], groups[data.splits.train])
    return {"test_images": len(test), "test_accuracy": round(float(correct.mean()), 4),
            "test_with_copy_in_training": int(leaked.sum()),
            "accuracy_without_copy": round(float(correct[~leaked].mean()), 4),
            "accuracy_with_copy": round(float(correct[leaked].mean()), 4)
            if leaked.any() else None}  # fmt: skip


def exclusion(workdir: Path, seed: int) -> dict:
    images = load_animals()
    rng = np.random.default_rng(seed)
    classes = sorted(set(images.names.tolist()))
    given = images.names.copy()
    flipped = rng.choice(len(given), len(given) // 10, replace=False)
    for index in flipped:
        given[index] = rng.choice([c for c in classes if c != images.names[index]])
    folder = workdir / "flipped"
    files = [f"{g}/{i:05d}.png" for i, g in enumerate(given)]
    write_folder(folder, images.pixels, given, files)
    truth = {str(folder / f): images.names[i] for i, f in enumerate(files)}
    result = {"flipped": len(flipped)}
    for fraction in (0.0, 0.1):
        name = f"exclude-{fraction}"
        artifact, config = train(folder, workdir / "out", name, exclude_suspected_labels=fraction)
        test, predicted, data = test_predictions(config, artifact)
        true = np.asarray([truth[p] for p in data.images.paths[test]])
        report = json.loads((artifact / "audit" / "report.json").read_text())
        excluded = [row["file"] for row in report["excluded_suspects"]]
        flipped_files = {files[i] for i in flipped}
        metadata = json.loads((artifact / "metadata.json").read_text())
        given_right = predicted == data.images.names[test]
        result[str(fraction)] = {
            "test_accuracy_true_labels": round(float((predicted == true).mean()), 4),
            "test_accuracy_given_labels": round(float(given_right.mean()), 4),
            "training_images": metadata["data"]["splits"]["train"],
            "excluded": len(excluded),
            "excluded_that_were_flipped": len(set(excluded) & flipped_files),
        }  # fmt: skip
    return result


def leakage_table(result: dict) -> str:
    lines = [
        "| training | split | test images | with a copy in training | test accuracy | on those "
        "with a copy | on those without | inflation (points) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"off": "old (by image, --audit off)", "warn": "group-aware (the audit's groups)"}
    for setting, runs in result.items():
        for mode, row in runs.items():
            inflation = 100 * (row["test_accuracy"] - row["accuracy_without_copy"])
            lines.append(
                f"| {setting} | {names[mode]} | {row['test_images']} | "
                f"{row['test_with_copy_in_training']} | {row['test_accuracy']} | "
                f"{row['accuracy_with_copy'] or '-'} | {row['accuracy_without_copy']} | "
                f"{inflation:+.2f} |"
            )
    return "\n".join(lines)


def exclusion_table(result: dict) -> str:
    rows = [
        "| training | training images | left out (of them flipped) | test accuracy, true "
        "labels | test accuracy, given labels |",
        "| --- | --- | --- | --- | --- |",
    ]
    for fraction, name in (("0.0", "all images"), ("0.1", "--exclude-suspected-labels 0.1")):
        row = result[fraction]
        rows.append(f"| {name} | {row['training_images']} | {row['excluded']} "
                    f"({row['excluded_that_were_flipped']}) | {row['test_accuracy_true_labels']} "
                    f"| {row['test_accuracy_given_labels']} |")  # fmt: skip
    return "\n".join(rows)
