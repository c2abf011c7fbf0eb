"""The training program: ``python -m training`` (and ``train-classifier``). The command line itself
is :mod:`training.cli`; running a parsed command, :mod:`training.commands`."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    # TensorFlow reads its log level once, when it is first imported: set it (quiet C++ banners)
    # before the job modules import it, which is why they are imported here and not above.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.cli import parse

    # The commands load TensorFlow and Keras (seconds, and their log lines): only once the
    # arguments are good, so that --help and a usage error answer at once.
    command, args = parse(argv)
    from training.commands import run_command

    return run_command(command, args)


if __name__ == "__main__":
    sys.exit(main())
