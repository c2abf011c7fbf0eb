"""Classify image files and folders from the command line, without a server.

    python -m service.predict photos/ cat.jpg --format csv --output labels.csv

Runs the service's own code path: :class:`service.classifier.Classifier`'s preprocess, predict
and postprocess steps, then top-k. The command line is derived from :class:`PredictConfig`.
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

from service.classifier import ModelLoadError, ModelSource, load_classifier, locate_model
from service.options import add_dataclass_options, config_from_args
from service.options import option as _option
from service.preprocessing import IMAGE_SUFFIXES, ImageError
from service.settings import DEFAULT_MODEL_NAME, ServiceSettings, available_cpus

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1
DESCRIPTION = "Classify image files and folders (recursively) with an exported ONNX model."


@dataclass
class Row:
    path: str
    label: str | None = None
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None


def write_table(rows: list[Row], stream) -> None:
    width = max([len(row.path) for row in rows] + [4])
    stream.write(f"{'file':<{width}}  {'label':<14} {'score':>6}  top-k / error\n")
    for row in rows:
        if row.error:
            stream.write(f"{row.path:<{width}}  {'-':<14} {'-':>6}  {row.error}\n")
        else:
            top = ", ".join(f"{entry['label']} {entry['score']:.2f}" for entry in row.top_k)
            stream.write(f"{row.path:<{width}}  {row.label:<14} {row.score:>6.3f}  {top}\n")


def write_csv(rows: list[Row], stream) -> None:
    writer = csv.writer(stream)
    writer.writerow(["path", "label", "score", "top_k", "error"])
    for row in rows:
        top = ";".join(f"{entry['label']}:{entry['score']:.6f}" for entry in row.top_k)
        score = "" if row.score is None else f"{row.score:.6f}"
        writer.writerow([row.path, row.label or "", score, top, row.error or ""])


def write_jsonl(rows: list[Row], stream) -> None:
    for row in rows:
        stream.write(json.dumps(row.__dict__) + "\n")


# Output formats: --format's choices are this table's keys.
WRITERS = {"table": write_table, "csv": write_csv, "jsonl": write_jsonl}


@dataclass(frozen=True)
class PredictConfig:
    """What to classify, with which model, and how to write the answers."""

    inputs: tuple[Path, ...] = _option(help="image files and/or folders", positional=True)
    model: str | None = _option(
        None,
        "artifact folder or model-store tag "
        f"(default: {DEFAULT_MODEL_NAME}:latest from the BentoML model store)",
    )
    format: str = _option("table", "how to write the rows", choices=tuple(WRITERS))
    output: Path | None = _option(None, "write the rows to this file (default: stdout)")
    top_k: int = _option(3, "labels per image")
    batch_size: int = _option(64, "images per onnxruntime call")
    evaluate: bool = _option(
        False, "report accuracy and a confusion matrix against the folder names"
    )
    threads: int = _option(0, "onnxruntime threads (default: 0, the CPUs available)")


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
    threads = threads or available_cpus()
    if reference and Path(reference).is_dir():
        return load_classifier(ModelSource(Path(reference).resolve(), reference), threads)
    return load_classifier(locate_model(ServiceSettings(model_tag=reference or "")), threads)


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
                inputs.append(classifier.preprocess(path.read_bytes()))
                kept.append(row)
            except ImageError as error:
                row.error = f"{error.code}: {error.detail}"
            except OSError as error:
                row.error = f"unreadable: {error}"
            rows.append(row)
        if inputs:
            probabilities = classifier.postprocess(classifier.predict(np.stack(inputs)))
            predictions = classifier.describe(probabilities, top_k)
            for row, prediction in zip(kept, predictions, strict=True):
                row.label, row.score, row.top_k = (
                    prediction["label"],
                    prediction["score"],
                    prediction["top_k"],
                )
        if progress is not None:
            progress(len(chunk))
    return rows


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
    parser = argparse.ArgumentParser(prog="python -m service.predict", description=DESCRIPTION)
    add_dataclass_options(parser, PredictConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv), PredictConfig)
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
            WRITERS[config.format](rows, stream)
    else:
        try:
            WRITERS[config.format](rows, sys.stdout)
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
