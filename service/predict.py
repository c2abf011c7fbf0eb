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
    label: str | None = None  # "unknown" for an input the detector flags (see --unknown-label)
    score: float | None = None
    top_k: list[dict] = field(default_factory=list)
    unknown: bool | None = None
    ood_score: float | None = None
    error: str | None = None


def _ood(row: Row) -> str:
    if row.ood_score is None:
        return "-"
    return f"{row.ood_score:.2f}{'!' if row.unknown else ''}"


def write_table(rows: list[Row], stream) -> None:
    width = max([len(row.path) for row in rows] + [4])
    stream.write(f"{'file':<{width}}  {'label':<14} {'score':>6} {'ood':>7}  top-k / error\n")
    for row in rows:
        if row.error:
            stream.write(f"{row.path:<{width}}  {'-':<14} {'-':>6} {'-':>7}  {row.error}\n")
        else:
            top = ", ".join(f"{entry['label']} {entry['score']:.2f}" for entry in row.top_k)
            stream.write(
                f"{row.path:<{width}}  {row.label:<14} {row.score:>6.3f} {_ood(row):>7}  {top}\n"
            )


def write_csv(rows: list[Row], stream) -> None:
    writer = csv.writer(stream)
    writer.writerow(["path", "label", "score", "top_k", "unknown", "ood_score", "error"])
    for row in rows:
        top = ";".join(f"{entry['label']}:{entry['score']:.6f}" for entry in row.top_k)
        score = "" if row.score is None else f"{row.score:.6f}"
        unknown = "" if row.unknown is None else str(row.unknown).lower()
        ood = "" if row.ood_score is None else f"{row.ood_score:.6f}"
        writer.writerow([row.path, row.label or "", score, top, unknown, ood, row.error or ""])


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
    unknown_label: bool = _option(
        True,
        "label an input the model's unknown-input detector flags 'unknown' (the table marks "
        "its ood score with '!'); off gives the top class",
    )


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
    classifier,
    paths: list[Path],
    top_k: int,
    batch_size: int,
    progress=None,
    unknown_label: bool = True,
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
            predictions = classifier.postprocess(classifier.predict(np.stack(inputs)))
            answers = classifier.describe(predictions, top_k, unknown_label)
            for row, answer in zip(kept, answers, strict=True):
                row.label, row.score, row.top_k = answer["label"], answer["score"], answer["top_k"]
                row.unknown, row.ood_score = answer["unknown"], answer["ood_score"]
        if progress is not None:
            progress(len(chunk))
    return rows


def evaluation(rows: list[Row], labels: list[str]) -> dict:
    """Against the parent folder name of each classified file: the accuracy and confusion
    matrix of the top class (the closest class for an input answered ``unknown``), how many
    were answered ``unknown``, and the accuracy of the others."""
    scored = [row for row in rows if row.label is not None and Path(row.path).parent.name in labels]
    if not scored:
        return {
            "images": 0,
            "accuracy": None,
            "unknown": 0,
            "accuracy_of_known": None,
            "confusion_matrix": [],
            "labels": labels,
        }
    index = {label: position for position, label in enumerate(labels)}
    truth = np.array([index[Path(row.path).parent.name] for row in scored])
    predicted = np.array([index[row.top_k[0]["label"]] for row in scored])
    unknown = np.array([bool(row.unknown) for row in scored])
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    known = ~unknown
    return {
        "images": len(scored),
        "accuracy": float(np.mean(truth == predicted)),
        "unknown": int(unknown.sum()),
        "accuracy_of_known": float(np.mean(truth[known] == predicted[known]))
        if known.any()
        else None,
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
        "(true label = parent folder name; top class)",
        f"unknown: {result['unknown']} of {result['images']} images "
        f"({result['unknown'] / result['images']:.1%}) flagged as unlike the training images"
        + (
            f"; accuracy of the others {result['accuracy_of_known']:.4f}"
            if result["accuracy_of_known"] is not None
            else ""
        ),
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
            unknown_label=config.unknown_label,
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
