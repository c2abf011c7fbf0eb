"""Classify image files and folders from the command line, without a server.

    python -m service.predict photos/ cat.jpg --format csv --output labels.csv

Runs the model core's own steps (:class:`service.core.classifier.Classifier`: preprocess,
predict, postprocess, the answers' top-k), with decoding in other processes
(:mod:`service.cli.decoders`). A run is planned, resumed where a stopped one left off, run, and
reported; ``--shard`` splits it across processes or pods (:mod:`service.cli.shards`), and
``merge`` joins the parts (:mod:`service.cli.merge`). The command line is derived from
:class:`PredictConfig`.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.cli.config import PredictConfig, build_parser
from service.cli.decoders import decoded_batches
from service.cli.evaluation import Tally, evaluation, format_evaluation
from service.cli.merge import merge_main
from service.cli.shards import (
    PART_FORMATS,
    BatchError,
    PartFiles,
    Shard,
    complete_lines,
    read_rows,
    write_summary,
)
from service.cli.writers import WRITERS, Row, chunks
from service.core import explain
from service.core.classifier import (
    Classifier,
    ModelLoadError,
    available_cpus,
    load_classifier,
    model_in_folder,
)
from service.core.options import config_from_args
from service.core.postprocessing import TopKError, choose_top_k
from service.core.preprocessing import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from service.registry.model_store import DEFAULT_MODEL_NAME, model_in_store

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1
EXIT_STOPPED = 143  # stopped by SIGTERM (128 + 15), the partial output kept for --resume


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


def open_model(reference: str | None, threads: int) -> Classifier:
    """A :class:`Classifier` from an artifact folder, a model-store tag, or ``animals:latest``."""
    if reference and _is_folder(reference):
        return load_classifier(model_in_folder(Path(reference), reference), threads)
    return load_classifier(model_in_store(reference or f"{DEFAULT_MODEL_NAME}:latest"), threads)


def _is_folder(reference: str) -> bool:
    """Whether ``--model`` names a folder (one the OS refuses to look at counts: loading it then
    says why)."""
    try:
        return Path(reference).is_dir()
    except OSError:
        return True


def classify_batches(
    classifier: Classifier,
    paths: list[Path],
    top_k: int,
    batch_size: int,
    unknown_label: bool = True,
    decoders: int = 1,
    explained: Callable[[Path, np.ndarray], None] | None = None,
) -> Iterator[list[Row]]:
    """Classify ``paths`` in batches, yielding each batch's rows as soon as it is done;
    unreadable files become rows with an ``error``. With ``decoders`` > 1, decoding and
    preprocessing run in that many processes, ahead of onnxruntime. ``explained`` is given each
    classified file and the ``(h, w)`` class activation map of its top class."""
    for batch, decoded in decoded_batches(
        paths, classifier.spec, batch_size, decoders, DEFAULT_MAX_PIXELS
    ):
        rows, inputs, kept, kept_paths = [], [], [], []
        for path, (pixels, error) in zip(batch, decoded, strict=True):
            row = Row(path=str(path), error=error)
            if pixels is not None:
                inputs.append(pixels)
                kept.append(row)
                kept_paths.append(path)
            rows.append(row)
        if inputs:
            answered = classifier.classify(np.stack(inputs), top_k, unknown_label)
            for row, answer in zip(kept, answered.to_dicts(), strict=True):
                row.label, row.score, row.top_k = answer["label"], answer["score"], answer["top_k"]
                row.unknown, row.ood_score = answer["unknown"], answer["ood_score"]
            if explained is not None:
                for path, cam in zip(kept_paths, answered.predictions.cams, strict=True):
                    explained(path, cam)
        yield rows


class OverlayWriter:
    """``--explain DIR``: each classified image with its map laid over it, written to
    ``DIR/<key>.png`` (``key``: the path relative to its input folder), atomically."""

    def __init__(self, folder: Path, keys: dict[str, str]) -> None:
        self.folder, self.keys = folder, keys

    def __call__(self, path: Path, cam: np.ndarray) -> None:
        target = self.folder / f"{self.keys[str(path)]}.png"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            data = explain.overlay_png(path.read_bytes(), cam)
            with tempfile.NamedTemporaryFile(
                dir=target.parent, prefix=".partial-", delete=False
            ) as handle:
                handle.write(data)
            os.replace(handle.name, target)
        except OSError as error:  # a full disk: the rows go on; the file is named
            print(f"warning: {target}: overlay not written ({error})", file=sys.stderr)


@dataclass
class Plan:
    """What one run does: its model, files, top-k, decoders and where it writes."""

    classifier: Classifier
    paths: list[Path]
    top_k: int
    decoders: int
    shard: Shard | None
    files: PartFiles | None  # None: rows go to stdout
    overlays: OverlayWriter | None = None  # --explain


def _checked_outputs(config: PredictConfig) -> tuple[Shard | None, PartFiles | None]:
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


def plan(config: PredictConfig) -> Plan:
    """Check the options, open the model and find the files (a shard's own, in path order, so
    that merge can interleave the parts without holding them).

    Raises:
        ModelLoadError, FileNotFoundError, ValueError: a line for the user.
    """
    shard, files = _checked_outputs(config)
    decoders = config.decoders or available_cpus()
    # The decoding processes keep the CPUs busy: onnxruntime's own thread pool would only
    # contend with them (measured: 380 -> 460 images/s with one thread on 2 cores).
    threads = config.threads or (1 if decoders > 1 else available_cpus())
    classifier = open_model(config.model, threads)
    try:
        top_k = choose_top_k(config.top_k, classifier.num_classes)
    except TopKError as error:
        raise ValueError(f"--top-k {config.top_k}: {error}") from None
    found = find_images(config.inputs)
    if shard:
        found = sorted(((path, key) for path, key in found if shard.holds(key)), key=_path_of)
    paths = [path for path, _ in found]
    overlays = None
    if config.explain is not None:
        try:
            explain.require_map(classifier.contract)
        except explain.ExplainError as error:
            raise ValueError(f"--explain: {error}") from None
        try:
            config.explain.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problem = f"--explain {config.explain}: cannot make the folder ({error})"
            raise ValueError(problem) from None
        overlays = OverlayWriter(config.explain, {str(path): key for path, key in found})
    return Plan(classifier, paths, top_k, decoders, shard, files, overlays)


def _path_of(found: tuple[Path, str]) -> str:
    return str(found[0])


def resume(run: Plan, config: PredictConfig, tally: Tally) -> bool:
    """With ``--resume``, count the rows a stopped run left and drop their files from the plan.

    Returns:
        Whether the output still needs a header (no rows were kept).
    """
    files = run.files
    if not (files and config.resume and files.partial.exists()):
        return True
    complete_lines(files.partial)
    done = set()
    for rows in chunks(read_rows(files.partial, config.format)):
        tally.add(rows)
        done.update(row["path"] for row in rows)
    run.paths = [path for path in run.paths if str(path) not in done]
    print(f"resuming: {len(done)} files already in {files.partial}, {len(run.paths)} to go")
    return files.partial.stat().st_size == 0


def finish_complete_part(run: Plan, config: PredictConfig, tally: Tally) -> bool:
    """With ``--resume`` on output that is already complete, say so (and write a part's summary
    if the run stopped between the part's rename and its summary). Returns whether it was."""
    files = run.files
    if not (files and config.resume and files.final.exists()):
        return False
    if files.summary and not files.summary.exists():
        for rows in chunks(read_rows(files.final, config.format)):
            tally.add(rows)
        _write_part_summary(run, config.format, tally)
    print(f"{files.final} is already complete; nothing to resume")
    return True


class _Stop:
    """SIGTERM (a Kubernetes pod being stopped) ends the run after the batch in progress."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True


def run_batches(run: Plan, config: PredictConfig, tally: Tally, header: bool) -> bool | None:
    """Classify the planned files, writing each batch's rows as it is done.

    Returns:
        Whether SIGTERM stopped the run; None when the reader of stdout went away (``head``).
    """
    from rich.progress import Progress

    files = run.files
    stream = files.partial.open("a" if config.resume else "w", newline="") if files else sys.stdout
    width = max([len(str(path)) for path in run.paths] + [4])
    stop = _Stop()
    try:
        writer = WRITERS[config.format](stream, width, header=header)
        quiet = len(run.paths) < 500 or not sys.stderr.isatty()
        with Progress(transient=True, disable=quiet) as bar:
            task = bar.add_task("classifying", total=len(run.paths))
            for rows in classify_batches(
                run.classifier,
                run.paths,
                run.top_k,
                config.batch_size,
                config.unknown_label,
                run.decoders,
                run.overlays,
            ):
                batch = [row.__dict__ for row in rows]
                writer.write(batch)
                stream.flush()
                tally.add(batch)
                bar.advance(task, len(rows))
                if stop.requested:
                    return True
    except BrokenPipeError:  # the reader (e.g. `head`) stopped early; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return None
    finally:
        if files:
            stream.close()
    return False


def report(run: Plan, config: PredictConfig, tally: Tally, seconds: float) -> int:
    """Put the complete output in place, print the summary (and evaluation); the exit status."""
    files, shard = run.files, run.shard
    if files:
        os.replace(files.partial, files.final)
        if files.summary:
            _write_part_summary(run, config.format, tally)
    # The summary and evaluation go to stderr when stdout carries CSV or JSON lines.
    out = sys.stderr if config.format != "table" and config.output is None else sys.stdout
    where = f", shard {shard} -> {files.final}" if shard else ""
    classifier = run.classifier
    print(
        f"{tally.classified} classified, {tally.failed} failed, model {classifier.name} "
        f"{classifier.version}{where}; {len(run.paths)} files in {seconds:.2f} s "
        f"({len(run.paths) / max(seconds, 1e-9):.1f} images/s, {run.decoders} decoding "
        "processes)",
        file=out,
    )
    if config.evaluate:
        print(format_evaluation(evaluation(tally)), file=out)
    # A shard's unreadable files are rows of its part, counted by merge: they do not fail the
    # process (a Kubernetes Job would retry it for nothing).
    return EXIT_SOME_FAILED if tally.failed and not shard else 0


def _write_part_summary(run: Plan, fmt: str, tally: Tally) -> None:
    """The summary beside a complete part: written last, it is what marks the part complete."""
    write_summary(
        run.files.summary,
        {
            "shard": str(run.shard),
            "file": run.files.final.name,
            "format": fmt,
            "files": tally.files,
            "classified": tally.classified,
            "failed": tally.failed,
            "model": {"name": run.classifier.name, "version": run.classifier.version},
            "labels": run.classifier.labels,
        },
    )


def main(argv: list[str] | None = None) -> int:
    """Plan, resume, run, report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    config = config_from_args(build_parser().parse_args(argv), PredictConfig)
    try:
        run = plan(config)
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    tally = Tally(run.classifier.labels, config.evaluate)
    if finish_complete_part(run, config, tally):
        return 0
    header = resume(run, config, tally)
    started = time.perf_counter()
    stopped = run_batches(run, config, tally, header)
    if stopped is None:
        return 0
    if stopped:
        print(
            f"stopped (SIGTERM) after {tally.files} files; the rows so far are in "
            f"{run.files.partial if run.files else 'the output'}: run again with --resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return report(run, config, tally, time.perf_counter() - started)
