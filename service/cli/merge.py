"""``python -m service.predict merge FOLDER``: the part files of a sharded run, checked complete
and from one model, merged into one file in path order (streaming), with the evaluation over all
shards."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from service.cli.evaluation import Tally, evaluation, format_evaluation
from service.cli.shards import BatchError, PartFiles, check_parts, merged_rows
from service.cli.writers import WRITERS, chunks
from service.core.options import add_dataclass_options, config_from_args
from service.core.options import option as _option

EXIT_USAGE = 2


@dataclass(frozen=True)
class MergeConfig:
    """Merge the part files of a sharded run into one file, in path order."""

    folder: tuple[Path, ...] = _option(help="the --output folder of the shards", positional=True)
    output: Path | None = _option(None, "the merged file (default: merged.<format> in the folder)")
    evaluate: bool = _option(
        False, "report accuracy and a confusion matrix over all shards, against the folder names"
    )


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.predict merge", description=MergeConfig.__doc__
    )
    add_dataclass_options(parser, MergeConfig)
    return parser


def merge_main(argv: list[str]) -> int:
    config = config_from_args(build_merge_parser().parse_args(argv), MergeConfig)
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
        for rows in chunks(merged_rows(folder, summaries)):
            writer.write(rows)
            tally.add(rows)
    os.replace(files.partial, output)
    model = first["model"]
    print(
        f"merged {len(summaries)} shards into {output}: {tally.files} files, "
        f"{tally.classified} classified, {tally.failed} failed, model "
        f"{model['name']} {model['version']}"
    )
    if config.evaluate:
        print(format_evaluation(evaluation(tally)))
    return 0
