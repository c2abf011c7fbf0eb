"""``--help`` of every command a user types exits 0 and prints its options, with no traceback:
the first command a newcomer runs."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT
from training.cli import COMMANDS

TRAINING = [["-m", "training", *([command] if command else [])] for command in COMMANDS]
CLI = [["-m", "service.predict"], ["-m", "service.predict", "merge"]]


@pytest.mark.parametrize("command", TRAINING + CLI, ids=lambda command: " ".join(command[1:]))
def test_help_exits_zero_and_lists_the_options(command):
    result = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # Nothing else: the job's modules (TensorFlow and its log lines) load after the arguments.
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: python {' '.join(command)}")
    assert "--help" in result.stdout and "options:" in result.stdout


def test_a_help_text_with_a_percent_sign_is_printed_as_written():
    # --ood-acceptance's help says "90% confidence", which argparse would %-format.
    result = subprocess.run(
        [sys.executable, "-m", "training", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "(with 90% confidence" in " ".join(result.stdout.split())


def test_the_commands_are_listed_once_and_each_has_its_runner():
    import ast

    source = (ROOT / "training" / "commands.py").read_text()
    functions = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    runners = {command.run for command in COMMANDS.values()}
    # Every command's runner is there, and every function there is a runner or the dispatch.
    assert functions - runners == {"configure_runtime", "run_command"}, functions - runners
    assert runners <= functions, runners - functions
    # The dispatch names no command: the list in training.cli is the only one.
    for name in COMMANDS:
        if name:
            assert f'"{name}"' not in source, name


def test_every_exit_status_has_its_own_meaning():
    from training.cli import ExitCode

    # __members__ keeps aliases, which iterating the enum would hide: a status given twice
    # shows here.
    members = ExitCode.__members__
    assert len({int(code) for code in members.values()}) == len(members)
    assert all(code.meaning for code in members.values())
    assert ExitCode.USAGE == 2  # argparse's own status for a usage error
