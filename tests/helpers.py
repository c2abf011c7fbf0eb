"""Helpers the tests share: images made with Pillow, the training CLI run as a user runs it, and
a real ``bentoml serve`` on a free loopback port."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.servers import free_port
from benchmarks.servers import server as serve_on_free_port

ROOT = Path(__file__).resolve().parent.parent
__all__ = [
    "ROOT",
    "bentoml_server",
    "encode_image",
    "free_port",
    "run_training_cli",
    "service_files",
    "shape_image",
    "write_class_folder",
]


def encode_image(pixels: np.ndarray, fmt: str, **save_args) -> bytes:
    """Encode an ``(H, W)`` or ``(H, W, 3)`` uint8 array in ``fmt`` (PNG, JPEG, GIF, ...)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def shape_image(kind: int, size: int, colour: bool, rng: np.random.Generator) -> np.ndarray:
    """A learnable synthetic image: class 0 a bright square, 1 a horizontal bar, 2 a vertical bar,
    placed at random, on a noisy dark background."""
    canvas = rng.integers(0, 40, (size, size), dtype=np.uint8)
    third = size // 3
    top, left = rng.integers(0, size - third, 2)
    if kind == 0:
        canvas[top : top + third, left : left + third] = 230
    elif kind == 1:
        canvas[top : top + max(2, size // 8), :] = 230
    else:
        canvas[:, left : left + max(2, size // 8)] = 230
    if colour:
        return np.stack([canvas, canvas // 2, 255 - canvas], axis=-1)
    return canvas


def write_class_folder(root: Path, classes: dict[str, int], per_class: int, seed: int = 0) -> Path:
    """A folder of class folders, mixing formats (PNG, JPEG, BMP, GIF, WEBP), sizes and grey/colour.

    Args:
        classes: folder name -> shape kind (0, 1 or 2) drawn in its images.
    """
    rng = np.random.default_rng(seed)
    formats = [
        ("PNG", ".png"),
        ("JPEG", ".jpg"),
        ("BMP", ".bmp"),
        ("GIF", ".gif"),
        ("WEBP", ".webp"),
    ]
    for name, kind in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            fmt, suffix = formats[index % len(formats)]
            size = (24, 32, 48)[index % 3]
            pixels = shape_image(kind, size, colour=index % 2 == 0, rng=rng)
            extra = {"quality": 95} if fmt == "JPEG" else {}
            (folder / f"{name}_{index:03d}{suffix}").write_bytes(encode_image(pixels, fmt, **extra))
    return root


def run_training_cli(
    *args: str, env: dict | None = None, timeout: int = 600, unset: tuple[str, ...] = ()
):
    """Run ``python -m training`` as a user would (``env`` added to this environment, the
    variables of ``unset`` taken out of it); returns the CompletedProcess."""
    environment = {name: value for name, value in os.environ.items() if name not in unset}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **(env or {})},
    )


@contextlib.contextmanager
def bentoml_server(model_folder: Path, workers: int = 2, **env: str):
    """A real ``bentoml serve`` of the service on a free loopback port; yields its base URL."""
    with serve_on_free_port(
        "service.service:ImageClassifier", model_folder, WORKERS=str(workers), **env
    ) as (url, _ready_seconds, _pid):
        yield url


def service_files() -> list[str]:
    """The service package's files the Bento must hold: every module and the page."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for pattern in ("*.py", "*.html")
        for path in (ROOT / "service").rglob(pattern)
    )


def api_workers(pid: int) -> list:
    """The API worker processes (``psutil.Process``) of the ``bentoml serve`` tree under
    ``pid``: the children whose command line names the service."""
    import psutil

    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if "image_classifier" in " ".join(child.cmdline())
    ]
