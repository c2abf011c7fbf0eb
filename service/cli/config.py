"""The batch CLI's typed configuration, and the command line derived from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from service.cli.writers import WRITERS
from service.core.options import add_dataclass_options
from service.core.options import option as _option
from service.core.postprocessing import DEFAULT_TOP_K
from service.registry.model_store import DEFAULT_MODEL_NAME

DESCRIPTION = "Classify image files and folders (recursively) with an exported ONNX model."


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
    explain: Path | None = _option(
        None,
        "write what the model looked at into this folder: each image with the class activation "
        "map of its top class laid over it, as <path relative to its input folder>.png",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.predict", description=DESCRIPTION)
    add_dataclass_options(parser, PredictConfig)
    return parser
