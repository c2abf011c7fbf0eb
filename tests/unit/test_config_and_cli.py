"""The typed configuration, the CLI derived from it, and CLI errors a user can act on."""

import pytest

from service.options import config_from_args
from training.__main__ import build_train_parser
from training.config import ConfigError, TrainConfig


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


def test_every_loss_and_optimizer_choice_builds():
    import dataclasses

    from training.model import build_loss, build_optimizer

    choices = {
        field.name: field.metadata.get("choices") for field in dataclasses.fields(TrainConfig)
    }
    for loss in choices["loss"]:
        assert build_loss(loss) is not None
    for optimizer in choices["optimizer"]:
        assert build_optimizer(optimizer, 0.01, 0.9).name == optimizer


@pytest.mark.parametrize("command", [None, "audit", "export", "fetch-weights", "samples"])
def test_every_help_text_renders(command):
    """argparse reads '%' in help as a format: '90% confidence' once broke --help."""
    from training.__main__ import build_parser

    text = build_parser(command).format_help()
    assert "usage: python -m training" in text
    if command is None:
        assert "(with 90%" in " ".join(text.split()) and "--exclude-suspected-labels" in text


def test_audit_options_are_checked():
    with pytest.raises(ConfigError, match="not with --audit off"):
        TrainConfig(audit="off", drop_duplicates=True)
    with pytest.raises(ConfigError, match="--exclude-suspected-labels must be in"):
        TrainConfig(exclude_suspected_labels=0.7)
    # Artifacts from before the audit were split without it: their re-export must split so too.
    assert TrainConfig.from_dict({"epochs": 3}).audit == "off"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).audit == "warn"
