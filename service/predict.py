"""Classify image files and folders from the command line, without a server.

    python -m service.predict photos/ cat.jpg --format csv --output labels.csv

Runs the service's own code path: the shared preprocessing, onnxruntime through
:class:`service.model.Classifier`, softmax and top-k.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.model import DEFAULT_MODEL_NAME, ModelLoadError, ModelSource, load_classifier
from service.preprocessing import IMAGE_SUFFIXES, ImageError, preprocess_bytes

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1


@dataclass(frozen=True)
class PredictConfig:
    """What to classify, with which model, and how to write the answers."""

    inputs: tuple[Path, ...]
    model: str | None = None  # artifact folder or model-store tag; None: <animals>:latest
    format: str = "table"
    output: Path | None = None
    top_k: int = 3
    batch_size: int = 64
    evaluate: bool = False
    threads: int = 0  # onnxruntime threads; 0: the CPUs this process may use


@dataclass
class Row:
    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None


def find_images(inputs: tuple[Path, ...]) -> list[Path]:
    """Files as given, and every image file below each folder (recursively), in sorted order."""
    found: list[Path] = []
    for entry in inputs:
        if entry.is_dir():
            found += sorted(
                path
                for path in entry.rglob("*")
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            )
        elif entry.is_file():
            found.append(entry)
        else:
            raise FileNotFoundError(f"{entry} is neither a file nor a folder")
    return found


def open_model(reference: str | None, threads: int):
    """A :class:`Classifier` from an artifact folder, a model-store tag, or ``animals:latest``."""
    from service.model import available_cpus, locate_model

    threads = threads or available_cpus()
    if reference and Path(reference).is_dir():
        return load_classifier(ModelSource(Path(reference).resolve(), reference), threads)
    tag = reference or f"{DEFAULT_MODEL_NAME}:latest"
    return load_classifier(locate_model({"MODEL_TAG": tag}), threads)


def classify_files(
    classifier, paths: list[Path], top_k: int, batch_size: int, progress=None
) -> list[Row]:
    """Classify ``paths`` in batches; unreadable files become rows with an ``error``."""
    rows: list[Row] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        inputs, kept = [], []
        for path in chunk:
            row = Row(path=str(path))
            try:
                inputs.append(preprocess_bytes(path.read_bytes(), classifier.spec))
                kept.append(row)
            except ImageError as error:
                row.error = f"{error.code}: {error.detail}"
            except OSError as error:
                row.error = f"unreadable: {error}"
            rows.append(row)
        if inputs:
            predictions = classifier.describe(classifier.probabilities(np.stack(inputs)), top_k)
            for row, prediction in zip(kept, predictions, strict=True):
                row.label, row.score, row.top_k = (
                    prediction["label"],
                    prediction["score"],
                    prediction["top_k"],
                )
        if progress is not None:
            progress(len(chunk))
    return rows


def write_rows(rows: list[Row], fmt: str, stream) -> None:
    if fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row.__dict__) + "\n")
    elif fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "score", "top_k", "error"])
        for row in rows:
            top = ";".join(f"{entry['label']}:{entry['score']:.6f}" for entry in row.top_k)
            score = "" if row.score is None else f"{row.score:.6f}"
            writer.writerow([row.path, row.label or "", score, top, row.error or ""])
    else:
        width = max([len(row.path) for row in rows] + [4])
        stream.write(f"{'file':<{width}}  {'label':<14} {'score':>6}  top-k / error\n")
        for row in rows:
            if row.error:
                stream.write(f"{row.path:<{width}}  {'-':<14} {'-':>6}  {row.error}\n")
            else:
                top = ", ".join(f"{entry['label']} {entry['score']:.2f}" for entry in row.top_k)
                stream.write(f"{row.path:<{width}}  {row.label:<14} {row.score:>6.3f}  {top}\n")


def evaluation(rows: list[Row], labels: list[str]) -> dict:
    """Accuracy and confusion matrix against the parent folder name of each classified file."""
    scored = [row for row in rows if row.label is not None and Path(row.path).parent.name in labels]
    if not scored:
        return {"images": 0, "accuracy": None, "confusion_matrix": [], "labels": labels}
    index = {label: position for position, label in enumerate(labels)}
    truth = np.array([index[Path(row.path).parent.name] for row in scored])
    predicted = np.array([index[row.label] for row in scored])
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    return {
        "images": len(scored),
        "accuracy": float(np.mean(truth == predicted)),
        "confusion_matrix": matrix.tolist(),
        "labels": labels,
    }


def format_evaluation(result: dict) -> str:
    if not result["images"]:
        return "evaluate: no classified image sits in a folder named after one of the labels"
    labels = result["labels"]
    width = max(len(label) for label in labels) + 1
    lines = [
        f"accuracy {result['accuracy']:.4f} on {result['images']} images "
        "(true label = parent folder name)",
        "confusion matrix (rows: true, columns: predicted)",
        " " * width + " ".join(f"{label[:6]:>6}" for label in labels),
    ]
    for label, counts in zip(labels, result["confusion_matrix"], strict=True):
        lines.append(f"{label:<{width}}" + " ".join(f"{count:>6d}" for count in counts))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.predict",
        description="Classify image files and folders (recursively) with an exported ONNX model.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    parser.add_argument(
        "--model",
        help="artifact folder or model-store tag "
        f"(default: {DEFAULT_MODEL_NAME}:latest from the BentoML model store)",
    )
    parser.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    parser.add_argument("--output", type=Path, help="write the rows here instead of stdout")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image (default: 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="report accuracy and a confusion matrix against the folder names",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime threads (default: the CPUs available)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PredictConfig(**{**vars(args), "inputs": tuple(args.inputs)})
    try:
        classifier = open_model(config.model, config.threads)
        if not 1 <= config.top_k <= classifier.num_classes:
            raise ValueError(f"--top-k must be between 1 and {classifier.num_classes}")
        paths = find_images(config.inputs)
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    from rich.progress import Progress

    with Progress(transient=True, disable=len(paths) < 500 or not sys.stderr.isatty()) as bar:
        task = bar.add_task("classifying", total=len(paths))
        rows = classify_files(
            classifier,
            paths,
            config.top_k,
            config.batch_size,
            progress=lambda done: bar.advance(task, done),
        )
    if config.output:
        with config.output.open("w", newline="") as stream:
            write_rows(rows, config.format, stream)
    else:
        try:
            write_rows(rows, config.format, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader (e.g. `head`) stopped early; that is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    # The summary and evaluation go to stderr when stdout carries CSV or JSON lines.
    report = sys.stderr if config.format != "table" and config.output is None else sys.stdout
    failed = sum(row.error is not None for row in rows)
    print(
        f"{len(rows) - failed} classified, {failed} failed, model {classifier.name} "
        f"{classifier.version}",
        file=report,
    )
    if config.evaluate:
        print(format_evaluation(evaluation(rows, classifier.labels)), file=report)
    return EXIT_SOME_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
