"""``python -m benchmarks.recipes``: the CNN recipes tried for the default, each trained by the job
itself (``python -m training``, export off) on the built-in set and on a second real dataset,
OpenCV's 5,000 handwritten digits written out as a class folder.

Each run's figures come from the artifact it wrote (``report.json``, ``metadata.json``) and are
appended to ``benchmarks/results/recipes.jsonl`` as soon as the run ends, so an interrupted
sweep continues where it stopped (``--fresh`` starts over). The table printed at the end is the
one in the README. Seconds are wall-clock on whatever machine runs it: compare recipes on
accuracy, and time them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results/recipes.jsonl")
DIGITS_FOLDER = Path("benchmarks/results/opencv-digits")

# Every flag of the recipe, spelled out, so a recipe means the same whatever the job's defaults.
BEFORE = {
    "epochs": 30,
    "batch-size": 32,
    "optimizer": "adam",
    "learning-rate": 1e-3,
    "lr-schedule": "plateau",
    "weight-decay": 0.0,
    "label-smoothing": 0.0,
    "shift": 0.05,
    "zoom": 0.05,
    "rotation": 0.0,
    "flip": False,
    "width": 32,
    "blocks": 2,
    "early-stopping-patience": 6,
}
ONE_CYCLE = BEFORE | {"epochs": 20, "lr-schedule": "one-cycle", "learning-rate": 3e-3}
# name -> (what changes, flags)
RECIPES = {
    "before": ("the landed default: Adam, halved on plateau, up to 30 epochs", BEFORE),
    "cosine-20": (
        "cosine decay over 20 epochs",
        BEFORE | {"epochs": 20, "lr-schedule": "cosine"},
    ),
    "one-cycle-20": ("one-cycle, peak 3e-3, 20 epochs", ONE_CYCLE),
    "one-cycle-20-adamw": (
        "+ AdamW, weight decay 0.05",
        ONE_CYCLE | {"optimizer": "adamw", "weight-decay": 0.05},
    ),
    "one-cycle-20-smooth": ("+ label smoothing 0.1", ONE_CYCLE | {"label-smoothing": 0.1}),
    "one-cycle-20-rotate": (
        "+ rotations up to 10 degrees, shifts up to 10%",
        ONE_CYCLE | {"rotation": 10.0, "shift": 0.1},
    ),
    "one-cycle-20-flip": ("+ left-right flips", ONE_CYCLE | {"flip": True}),
    "one-cycle-20-flip-3-blocks": (
        "+ flips, a third block (7 -> 3 pixels, 128 filters)",
        ONE_CYCLE | {"flip": True, "blocks": 3},
    ),
    "one-cycle-20-3-blocks": (
        "one-cycle, 20 epochs, a third block, no flips: the new default",
        ONE_CYCLE | {"blocks": 3},
    ),
    "one-cycle-15-3-blocks": (
        "the same in 15 epochs",
        ONE_CYCLE | {"blocks": 3, "epochs": 15},
    ),
}
DATASETS = ("animals", "digits")


def flags(settings: dict) -> list[str]:
    """The job's command-line flags of a recipe's settings."""
    arguments = []
    for name, value in settings.items():
        if isinstance(value, bool):
            arguments.append(f"--{name}" if value else f"--no-{name}")
        else:
            arguments += [f"--{name}", str(value)]
    return arguments


def write_digits_folder(folder: Path = DIGITS_FOLDER) -> Path:
    """OpenCV's digits as PNG files in one sub-folder per digit (written once)."""
    from PIL import Image

    from training.quality.outliers import opencv_digits

    if (folder / "9").is_dir() and len(list((folder / "9").iterdir())) == 500:
        return folder
    cells, labels = opencv_digits()
    for index, (cell, label) in enumerate(zip(cells, labels, strict=True)):
        target = folder / str(label) / f"{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cell).save(target)
    return folder


def run_one(dataset: str, recipe: str, seed: int) -> dict:
    """Train one recipe on one dataset with the job's CLI; its figures."""
    data = "animals" if dataset == "animals" else str(write_digits_folder())
    with tempfile.TemporaryDirectory(prefix="recipe-") as output:
        command = [
            sys.executable,
            "-m",
            "training",
            "--data",
            data,
            "--seed",
            str(seed),
            "--output",
            output,
            "--name",
            "recipe",
            "--no-export",
            "--no-publish",
            *flags(RECIPES[recipe][1]),
        ]
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        folder = Path(output) / "recipe" / "latest"
        report = json.loads((folder / "report.json").read_text())
        metadata = json.loads((folder / "metadata.json").read_text())
    return {
        "dataset": dataset,
        "recipe": recipe,
        "seed": seed,
        "test_accuracy": report["test_accuracy"],
        "test_images": report["num_test_images"],
        "final_train_accuracy": round(metadata["metrics"]["final_train_accuracy"], 4),
        "epochs_run": metadata["training"]["epochs_run"],
        "fit_seconds": metadata["training"]["fit_seconds"],
        "job_seconds": round(seconds, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }


def table(rows: list[dict]) -> str:
    """Markdown: per recipe, the mean test accuracy over seeds on each dataset (with the
    runs' range), and the fit's minutes on the built-in set with the machine's load average
    when the run ended (minutes on a loaded machine are inflated: compare on accuracy)."""
    lines = [
        "| recipe | what changes | built-in set: test accuracy | fit minutes (load average) | "
        "real digits: test accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(recipe: str, dataset: str) -> str:
        values = [row["test_accuracy"] for row in rows if (row["recipe"], row["dataset"]) == (
            recipe, dataset)]  # fmt: skip
        if not values:
            return "not run"
        text = f"{np.mean(values):.4f}"
        if len(values) > 1:
            text += f" ({min(values):.4f}-{max(values):.4f}, {len(values)} seeds)"
        return text

    for recipe, (what, _) in RECIPES.items():
        runs = [row for row in rows if (row["recipe"], row["dataset"]) == (recipe, "animals")]
        shown = ""
        if runs:
            minutes = np.mean([row["fit_seconds"] / 60 for row in runs])
            shown = f"{minutes:.1f} ({np.mean([row['load_average'] for row in runs]):.1f})"
        lines.append(
            f"| `{recipe}` | {what} | {cell(recipe, 'animals')} | {shown} | "
            f"{cell(recipe, 'digits')} |"
        )
    return "\n".join(lines)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="animals,digits")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    recipes = [name for name in args.recipes.split(",") if name]
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        args.results.unlink(missing_ok=True)
    rows = read_results(args.results)
    if not args.table:
        done = {(row["dataset"], row["recipe"], row["seed"]) for row in rows}
        for seed in (int(text) for text in args.seeds.split(",")):
            for recipe in recipes:
                for dataset in args.datasets.split(","):
                    if (dataset, recipe, seed) in done:
                        continue
                    row = run_one(dataset, recipe, seed)
                    print(json.dumps(row), flush=True)
                    with args.results.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    rows.append(row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
