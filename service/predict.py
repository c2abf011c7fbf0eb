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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.batch import (
    PART_FORMATS,
    BatchError,
    PartFiles,
    Shard,
    check_parts,
    complete_lines,
    decoded_batches,
    merged_rows,
    read_rows,
    write_summary,
)
from service.classifier import ModelLoadError, ModelSource, load_classifier, locate_model
from service.options import add_dataclass_options, config_from_args
from service.options import option as _option
from service.preprocessing import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from service.settings import DEFAULT_MODEL_NAME, DEFAULT_TOP_K, ServiceSettings, available_cpus

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1
EXIT_STOPPED = 143  # stopped by SIGTERM (128 + 15), the partial output kept for --resume
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


def _first_label(row: dict) -> str | None:
    """The top class of a row, whether ``top_k`` is a list (fresh) or CSV text (read back)."""
    top = row.get("top_k")
    if isinstance(top, str):
        return top.split(";")[0].rsplit(":", 1)[0] if top else None
    return top[0]["label"] if top else None


def _flag(row: dict) -> bool:
    value = row.get("unknown")
    return value is True or value == "true"


def _ood(row: dict) -> str:
    if row.get("ood_score") in (None, ""):
        return "-"
    return f"{float(row['ood_score']):.2f}{'!' if _flag(row) else ''}"


class TableWriter:
    """Aligned columns for a terminal; ``width`` is the longest path of the run."""

    def __init__(self, stream, width: int = 4, header: bool = True) -> None:
        self.stream, self.width = stream, max(width, 4)
        if header:
            title = f"{'file':<{self.width}}  {'label':<14} {'score':>6} {'ood':>7}  top-k / error"
            stream.write(title + "\n")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            path = f"{row['path']:<{self.width}}"
            if row.get("error"):
                self.stream.write(f"{path}  {'-':<14} {'-':>6} {'-':>7}  {row['error']}\n")
                continue
            top = ", ".join(f"{entry['label']} {entry['score']:.2f}" for entry in row["top_k"])
            score = f"{row['score']:>6.3f}"
            self.stream.write(f"{path}  {row['label']:<14} {score} {_ood(row):>7}  {top}\n")


class CsvWriter:
    COLUMNS = ("path", "label", "score", "top_k", "unknown", "ood_score", "error")

    def __init__(self, stream, width: int = 0, header: bool = True) -> None:
        self.writer = csv.writer(stream)
        if header:
            self.writer.writerow(self.COLUMNS)

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if isinstance(row.get("top_k"), str):  # read back from a CSV part: as it was
                self.writer.writerow([row.get(column) or "" for column in self.COLUMNS])
                continue
            top = ";".join(f"{entry['label']}:{entry['score']:.6f}" for entry in row["top_k"])
            score = "" if row["score"] is None else f"{row['score']:.6f}"
            unknown = "" if row["unknown"] is None else str(row["unknown"]).lower()
            ood = "" if row["ood_score"] is None else f"{row['ood_score']:.6f}"
            self.writer.writerow(
                [row["path"], row["label"] or "", score, top, unknown, ood, row["error"] or ""]
            )


class JsonlWriter:
    def __init__(self, stream, width: int = 0, header: bool = True) -> None:
        self.stream = stream

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self.stream.write(json.dumps(row) + "\n")


# Output formats: --format's choices are this table's keys.
WRITERS = {"table": TableWriter, "csv": CsvWriter, "jsonl": JsonlWriter}


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
    output: Path | None = _option(
        None,
        "write the rows to this file (default: stdout), or with --shard into this folder; the "
        "file is written under a temporary name and renamed when complete",
    )
    top_k: int | None = _option(
        None, f"labels per image (default: {DEFAULT_TOP_K}, or every class of a smaller model)"
    )
    batch_size: int = _option(64, "images per onnxruntime call")
    evaluate: bool = _option(
        False, "report accuracy and a confusion matrix against the folder names"
    )
    threads: int = _option(
        0,
        "onnxruntime threads (default: 0, one while decoding runs in other processes, else the "
        "CPUs available)",
    )
    decoders: int = _option(
        0,
        "processes that decode and preprocess images ahead of onnxruntime (default: 0, one per "
        "CPU available; 1 decodes in this process)",
    )
    unknown_label: bool = _option(
        True,
        "label an input the model's unknown-input detector flags 'unknown' (the table marks "
        "its ood score with '!'); off gives the top class",
    )
    shard: str | None = _option(
        None,
        "I/N: classify only shard I (0-based) of N, the files whose stable hash of the path "
        "relative to its input folder falls there; writes part-IIIII-of-NNNNN.<format> into the "
        "--output folder (then: merge FOLDER)",
    )
    resume: bool = _option(
        False,
        "continue a stopped run: keep the rows its partial output holds and classify the rest "
        "(needs --output)",
    )


def find_images(inputs: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """Files as given, and every image file below each folder (recursively), in sorted order,
    each with its key: the path relative to the folder it was found in (a file's own name)."""
    found: list[tuple[Path, str]] = []
    for entry in inputs:
        if entry.is_dir():
            found += sorted(
                (path, path.relative_to(entry).as_posix())
                for path in entry.rglob("*")
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            )
        elif entry.is_file():
            found.append((entry, entry.name))
        else:
            raise FileNotFoundError(f"{entry} is neither a file nor a folder")
    return found


def open_model(reference: str | None, threads: int):
    """A :class:`Classifier` from an artifact folder, a model-store tag, or ``animals:latest``."""
    threads = threads or available_cpus()
    if reference and Path(reference).is_dir():
        return load_classifier(ModelSource(Path(reference).resolve(), reference), threads)
    return load_classifier(locate_model(ServiceSettings(model_tag=reference or "")), threads)


def classify_batches(
    classifier,
    paths: list[Path],
    top_k: int,
    batch_size: int,
    unknown_label: bool = True,
    decoders: int = 1,
) -> Iterator[list[Row]]:
    """Classify ``paths`` in batches, yielding each batch's rows as soon as it is done;
    unreadable files become rows with an ``error``. With ``decoders`` > 1, decoding and
    preprocessing run in that many processes, ahead of onnxruntime."""
    for batch, decoded in decoded_batches(
        paths, classifier.spec, batch_size, decoders, DEFAULT_MAX_PIXELS
    ):
        rows, inputs, kept = [], [], []
        for path, (pixels, error) in zip(batch, decoded, strict=True):
            row = Row(path=str(path), error=error)
            if pixels is not None:
                inputs.append(pixels)
                kept.append(row)
            rows.append(row)
        if inputs:
            predictions = classifier.postprocess(classifier.predict(np.stack(inputs)))
            answers = classifier.describe(predictions, top_k, unknown_label)
            for row, answer in zip(kept, answers, strict=True):
                row.label, row.score, row.top_k = answer["label"], answer["score"], answer["top_k"]
                row.unknown, row.ood_score = answer["unknown"], answer["ood_score"]
        yield rows


class Tally:
    """Counts of a run, kept as rows stream past (memory stays flat): classified and failed,
    and for --evaluate the true, top and unknown of each file in a folder named after a label."""

    def __init__(self, labels: list[str], evaluate: bool) -> None:
        self.labels, self.evaluate = labels, evaluate
        self.index = {label: position for position, label in enumerate(labels)}
        self.classified = self.failed = 0
        self.truth: list[int] = []
        self.top: list[int] = []
        self.unknown: list[bool] = []

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("error"):
                self.failed += 1
                continue
            self.classified += 1
            folder = Path(row["path"]).parent.name
            if self.evaluate and folder in self.index:
                self.truth.append(self.index[folder])
                self.top.append(self.index[_first_label(row)])
                self.unknown.append(_flag(row))


def evaluation(tally: Tally) -> dict:
    """Against the parent folder name of each classified file: the accuracy and confusion
    matrix of the top class (the closest class for an input answered ``unknown``), how many
    were answered ``unknown``, and the accuracy of the others."""
    labels = tally.labels
    if not tally.truth:
        return {
            "images": 0,
            "accuracy": None,
            "unknown": 0,
            "accuracy_of_known": None,
            "confusion_matrix": [],
            "labels": labels,
        }
    truth, predicted = np.array(tally.truth), np.array(tally.top)
    unknown = np.array(tally.unknown, dtype=bool)
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    known = ~unknown
    return {
        "images": len(truth),
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


def _plan(config: PredictConfig) -> tuple[Shard | None, PartFiles | None]:
    """The shard and the files to write, after checking the options that go together."""
    shard = Shard.parse(config.shard) if config.shard else None
    if shard and config.output is None:
        raise BatchError("--shard needs --output FOLDER, where the shard's part file goes")
    if shard and config.format not in PART_FORMATS:
        raise BatchError(f"--shard writes csv or jsonl, not {config.format}: add --format csv")
    if config.resume and config.output is None:
        raise BatchError("--resume needs --output, the file (or --shard folder) to continue")
    if shard:
        config.output.mkdir(parents=True, exist_ok=True)
        return shard, PartFiles.for_shard(config.output, shard, config.format)
    if config.output:
        return None, PartFiles.for_file(config.output)
    return None, None


class _Stop:
    """SIGTERM (a Kubernetes pod being stopped) ends the run after the batch in progress."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    config = config_from_args(build_parser().parse_args(argv), PredictConfig)
    try:
        shard, files = _plan(config)
        decoders = config.decoders or available_cpus()
        # The decoding processes keep the CPUs busy: onnxruntime's own thread pool would only
        # contend with them (measured: 380 -> 460 images/s with one thread on 2 cores).
        threads = config.threads or (1 if decoders > 1 else available_cpus())
        classifier = open_model(config.model, threads)
        top_k = config.top_k
        if top_k is None:
            top_k = min(DEFAULT_TOP_K, classifier.num_classes)
        if not 1 <= top_k <= classifier.num_classes:
            raise ValueError(f"--top-k must be between 1 and {classifier.num_classes}")
        found = find_images(config.inputs)
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if shard:
        # Sorted by path, so that merge can interleave the parts without holding them.
        found = sorted(((path, key) for path, key in found if shard.holds(key)), key=_path_key)
    paths = [path for path, _ in found]
    tally = Tally(classifier.labels, config.evaluate)
    if files and files.final.exists() and config.resume:
        if files.summary and not files.summary.exists():
            # Stopped between the part's rename and its summary: count the part, then mark it.
            for rows in _chunks(read_rows(files.final, config.format), 1000):
                tally.add(rows)
            _write_part_summary(files, shard, config.format, tally, classifier)
        print(f"{files.final} is already complete; nothing to resume")
        return 0
    header = True
    if files and config.resume and files.partial.exists():
        complete_lines(files.partial)
        header = files.partial.stat().st_size == 0
        done = set()
        for done_rows in _chunks(read_rows(files.partial, config.format), 1000):
            tally.add(done_rows)
            done.update(row["path"] for row in done_rows)
        paths = [path for path in paths if str(path) not in done]
        print(f"resuming: {len(done)} files already in {files.partial}, {len(paths)} to go")
    mode = "a" if config.resume else "w"
    stream = files.partial.open(mode, newline="") if files else sys.stdout
    width = max([len(str(path)) for path in paths] + [4])
    stop = _Stop()
    started = time.perf_counter()

    from rich.progress import Progress

    try:
        writer = WRITERS[config.format](stream, width, header=header)
        with Progress(transient=True, disable=len(paths) < 500 or not sys.stderr.isatty()) as bar:
            task = bar.add_task("classifying", total=len(paths))
            for rows in classify_batches(
                classifier, paths, top_k, config.batch_size, config.unknown_label, decoders
            ):
                batch = [row.__dict__ for row in rows]
                writer.write(batch)
                stream.flush()
                tally.add(batch)
                bar.advance(task, len(rows))
                if stop.requested:
                    break
    except BrokenPipeError:  # the reader (e.g. `head`) stopped early; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if files:
            stream.close()
    if stop.requested:
        print(
            f"stopped (SIGTERM) after {tally.classified + tally.failed} files; the rows so far "
            f"are in {files.partial if files else 'the output'}: run again with --resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if files:
        os.replace(files.partial, files.final)
        if files.summary:
            _write_part_summary(files, shard, config.format, tally, classifier)
    # The summary and evaluation go to stderr when stdout carries CSV or JSON lines.
    report = sys.stderr if config.format != "table" and config.output is None else sys.stdout
    where = f", shard {shard} -> {files.final}" if shard else ""
    seconds = time.perf_counter() - started
    print(
        f"{tally.classified} classified, {tally.failed} failed, model {classifier.name} "
        f"{classifier.version}{where}; {len(paths)} files in {seconds:.2f} s "
        f"({len(paths) / max(seconds, 1e-9):.1f} images/s, {decoders} decoding processes)",
        file=report,
    )
    if config.evaluate:
        print(format_evaluation(evaluation(tally)), file=report)
    # A shard's unreadable files are rows of its part, counted by merge: they do not fail the
    # process (a Kubernetes Job would retry it for nothing).
    return EXIT_SOME_FAILED if tally.failed and not shard else 0


def _write_part_summary(files: PartFiles, shard: Shard, fmt: str, tally: Tally, classifier) -> None:
    """The summary beside a complete part: written last, it is what marks the part complete."""
    write_summary(
        files.summary,
        {
            "shard": str(shard),
            "file": files.final.name,
            "format": fmt,
            "files": tally.classified + tally.failed,
            "classified": tally.classified,
            "failed": tally.failed,
            "model": {"name": classifier.name, "version": classifier.version},
            "labels": classifier.labels,
        },
    )


def _chunks(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _path_key(found: tuple[Path, str]) -> str:
    return str(found[0])


@dataclass(frozen=True)
class MergeConfig:
    """Merge the part files of a sharded run into one file, in path order."""

    folder: tuple[Path, ...] = _option(help="the --output folder of the shards", positional=True)
    output: Path | None = _option(None, "the merged file (default: merged.<format> in the folder)")
    evaluate: bool = _option(
        False, "report accuracy and a confusion matrix over all shards, against the folder names"
    )


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.predict merge", description=MergeConfig.__doc__
    )
    add_dataclass_options(parser, MergeConfig)
    config = config_from_args(parser.parse_args(argv), MergeConfig)
    if len(config.folder) != 1:
        print("error: merge takes one folder, the --output folder of the shards", file=sys.stderr)
        return EXIT_USAGE
    (folder,) = config.folder
    try:
        summaries = check_parts(folder)
    except (BatchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    first = summaries[0]
    output = config.output or folder / f"merged.{first['format']}"
    files = PartFiles.for_file(output)
    tally = Tally(first["labels"], config.evaluate)
    with files.partial.open("w", newline="") as stream:
        writer = WRITERS[first["format"]](stream)
        for rows in _chunks(merged_rows(folder, summaries), 1000):
            writer.write(rows)
            tally.add(rows)
    os.replace(files.partial, output)
    model = first["model"]
    print(
        f"merged {len(summaries)} shards into {output}: {tally.classified + tally.failed} files, "
        f"{tally.classified} classified, {tally.failed} failed, model "
        f"{model['name']} {model['version']}"
    )
    if config.evaluate:
        print(format_evaluation(evaluation(tally)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
