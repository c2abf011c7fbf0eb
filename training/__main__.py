"""The training program: ``python -m training`` (and ``train-classifier``). The command line itself
is :mod:`training.cli`; running a parsed command, :mod:`training.commands`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from training.cli import parse
    from training.startup import line_buffered_output, start_tensorflow

    line_buffered_output()

    # The commands load TensorFlow and Keras (seconds, and their log lines): only once the
    # arguments are good, so that --help and a usage error answer at once.
    command, args = parse(argv)
    # TensorFlow reads its log level once, when it is first imported: it is started here,
    # before the job's modules import it, which is why they are imported here and not above.
    start_tensorflow()
    from training.commands import run_command

    return run_command(command, args)


if __name__ == "__main__":
    sys.exit(main())
