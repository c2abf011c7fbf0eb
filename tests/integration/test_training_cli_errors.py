"""CLI errors of the training job a user can act on: one line naming the problem, no traceback,
nothing written."""

import pytest

from tests.helpers import run_training_cli, write_class_folder

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "no/such/folder"], "no/such/folder is not a folder"),
        (["--classes", "cat,unicorn"], "unicorn"),
        (["--other", "other"], "--other needs --classes"),
        (["--optimizer", "rmsprop"], "invalid choice"),
    ],
)
def test_cli_errors_name_the_problem_without_a_traceback(args, expected, tmp_path):
    result = run_training_cli(*args, "--output", str(tmp_path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(tmp_path.iterdir()), "a failed run must write nothing"


def test_cli_error_for_a_folder_with_an_empty_class(tmp_path):
    data = write_class_folder(tmp_path / "data", {"square": 0, "bar": 1}, per_class=2)
    (data / "nothing_here").mkdir()
    result = run_training_cli("--data", str(data), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "nothing_here" in result.stderr and "Traceback" not in result.stderr
