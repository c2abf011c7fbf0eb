"""The training program's process start: its output line by line, and TensorFlow started quietly.

Python buffers its standard output in blocks when it goes to a pipe or a file (``make train |
tee``, a Kubernetes log), so a run's epoch lines would only appear when it ends: both streams are
made line-buffered instead. TensorFlow writes CUDA lines on every CPU-only machine, some of them
marked as errors ("failed call to cuInit"), before its log level applies: on a machine without
an NVIDIA driver they are dropped, unless ``TF_CPP_MIN_LOG_LEVEL`` is set, which asks for
TensorFlow's own logging as it is."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What TensorFlow writes at its start on a machine with no GPU (its C++ logging, straight to
# file descriptor 2, before its log level applies).
START_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning"
)
NVIDIA_DRIVER = (Path("/proc/driver/nvidia/version"), Path("/dev/nvidiactl"))


def line_buffered_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)


def has_nvidia_driver() -> bool:
    return any(path.exists() for path in NVIDIA_DRIVER)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """File descriptor 2 (where C++ libraries write) into a file for the block's length, then
    every line of it that ``noise`` does not match written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().splitlines(keepends=True)
            kept = [line for line in lines if not noise.search(line.decode(errors="replace"))]
            if kept:
                os.write(2, b"".join(kept))


def start_tensorflow() -> None:
    """Import TensorFlow, at the log level asked for or, by default, without its CUDA lines on
    a machine that has no NVIDIA driver (and its C++ info and warning lines everywhere)."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow  # noqa: F401

        return
    if has_nvidia_driver():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        import tensorflow  # noqa: F401

        return
    # Level 3 keeps cuInit's error line away (TensorFlow's errors still reach Python as
    # exceptions); the lines written before the level applies are filtered.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with filtered_stderr(START_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # where cuInit runs
