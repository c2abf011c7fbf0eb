"""CLI errors of the training job a user can act on: one line naming the problem, no traceback,
nothing written."""

import pytest

from tests.helpers import run_training_cli, write_class_folder
from training.cli import ExitCode
from training.startup import has_nvidia_driver

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    ("args", "expected", "status"),
    [
        (["--data", "no/such/folder"], "no/such/folder is not a folder", ExitCode.DATA),
        (["--classes", "cat,unicorn"], "unicorn", ExitCode.DATA),
        (["--other", "other"], "--other needs --classes", ExitCode.USAGE),
        (["--optimizer", "rmsprop"], "invalid choice", ExitCode.USAGE),
    ],
)
def test_cli_errors_name_the_problem_without_a_traceback(args, expected, status, tmp_path):
    # TensorFlow's log level as a user has it: not set (the tests' own session sets it).
    result = run_training_cli(*args, "--output", str(tmp_path), unset=("TF_CPP_MIN_LOG_LEVEL",))
    assert result.returncode == status, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(tmp_path.iterdir()), "a failed run must write nothing"
    if not has_nvidia_driver():  # no CUDA lines on a machine without a GPU
        assert "cuInit" not in result.stderr and "cuda" not in result.stderr.lower()


def test_cli_error_for_a_folder_with_an_empty_class(tmp_path):
    data = write_class_folder(tmp_path / "data", {"square": 0, "bar": 1}, per_class=2)
    (data / "nothing_here").mkdir()
    result = run_training_cli("--data", str(data), "--output", str(tmp_path / "out"))
    assert result.returncode == ExitCode.DATA
    assert "nothing_here" in result.stderr and "Traceback" not in result.stderr
