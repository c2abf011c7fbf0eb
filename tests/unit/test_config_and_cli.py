"""The typed configuration, the CLI derived from it, and CLI errors a user can act on."""

import pytest

from tests.conftest import run_training_cli, write_class_folder
from training.__main__ import build_train_parser
from training.config import ConfigError, TrainConfig, config_from_args


def test_cli_defaults_are_the_config_defaults():
    args = build_train_parser().parse_args([])
    assert config_from_args(args, TrainConfig) == TrainConfig()
    assert TrainConfig().batch_size == 32


def test_cli_parses_every_kind_of_option():
    args = build_train_parser().parse_args(
        [
            "--classes",
            "cat, dog",
            "--other",
            "other",
            "--epochs",
            "3",
            "--no-augment",
            "--optimizer",
            "sgd",
            "--learning-rate",
            "0.01",
            "--loss",
            "mse",
            "--image-size",
            "32",
        ]
    )
    config = config_from_args(args, TrainConfig)
    assert config.classes == ("cat", "dog")
    assert (config.other, config.epochs, config.augment) == ("other", 3, False)
    assert (config.optimizer, config.learning_rate, config.loss) == ("sgd", 0.01, "mse")
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"validation_split": 0.5, "test_split": 0.45}, "at least 10%"),
        ({"other": "other"}, "--other needs --classes"),
        ({"classes": ("cat",), "other": "cat"}, "also listed"),
        ({"name": "../escape"}, "--name"),
    ],
)
def test_impossible_configurations_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


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
