"""The typed configuration, the CLI derived from it, and CLI errors a user can act on."""

import pytest

from service.core.options import config_from_args
from training.cli import build_parser
from training.config import ConfigError, TrainConfig


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args([])
    assert config_from_args(args, TrainConfig) == TrainConfig()


def test_cli_parses_every_kind_of_option():
    args = build_parser().parse_args(
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


def test_every_loss_and_optimizer_choice_builds_one_that_learns():
    import dataclasses

    import keras
    import numpy as np

    from training.model import build_loss, build_optimizer

    choices = {
        field.name: field.metadata.get("choices") for field in dataclasses.fields(TrainConfig)
    }
    one_hot = np.eye(3, dtype="float32")
    right = 5 * one_hot  # logits that favour the true class
    for loss in choices["loss"]:
        values = [float(np.mean(build_loss(loss)(one_hot, logits))) for logits in (right, -right)]
        assert 0 <= values[0] < values[1], (loss, values)
    for optimizer in choices["optimizer"]:
        weight = keras.Variable(np.float32(1.0))
        step = build_optimizer(optimizer, 0.1, 0.9)
        assert step.name == optimizer
        step.apply_gradients([(keras.ops.convert_to_tensor(np.float32(1.0)), weight)])
        assert float(weight.numpy()) < 1.0, optimizer  # a step against the gradient


def test_audit_options_are_checked():
    with pytest.raises(ConfigError, match="not with --audit off"):
        TrainConfig(audit="off", drop_duplicates=True)
    with pytest.raises(ConfigError, match="--exclude-suspected-labels must be in"):
        TrainConfig(exclude_suspected_labels=0.7)
    # Artifacts from before the audit were split without it: their re-export must split so too.
    assert TrainConfig.from_dict({"epochs": 3}).audit == "off"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).audit == "warn"
