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
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"weight_decay": -0.1}, "--weight-decay"),
        ({"rotation": 200.0}, "--rotation"),
        ({"shift": 0.5}, "--shift"),
        ({"width": 2}, "--width"),
    ],
)
def test_impossible_configurations_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_every_loss_and_optimizer_choice_builds_one_that_learns():
    import dataclasses

    import keras
    import numpy as np

    from training.model.cnn import build_loss, build_optimizer

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
        assert step.name == optimizer.replace("adamw", "adam_w")
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


def test_the_recipe_options_parse_and_round_trip():
    args = build_parser().parse_args(
        [
            "--optimizer",
            "adamw",
            "--weight-decay",
            "0.05",
            "--lr-schedule",
            "one-cycle",
            "--label-smoothing",
            "0.1",
            "--shift",
            "0.1",
            "--zoom",
            "0.1",
            "--rotation",
            "10",
            "--flip",
            "--width",
            "48",
        ]
    )
    config = config_from_args(args, TrainConfig)
    assert (config.optimizer, config.weight_decay, config.lr_schedule) == (
        "adamw",
        0.05,
        "one-cycle",
    )
    assert (config.label_smoothing, config.rotation, config.flip, config.width) == (
        0.1,
        10.0,
        True,
        48,
    )
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("schedule", ["cosine", "one-cycle"])
def test_schedules_warm_up_to_the_peak_then_decay_to_zero(schedule):
    import numpy as np

    from training.model.cnn import learning_rate_schedule

    steps, epochs, peak = 100, 10, 3e-3
    curve = learning_rate_schedule(schedule, peak, steps, epochs)
    rates = np.array([float(curve(step)) for step in range(0, steps * epochs + 1, 10)])
    top = int(np.argmax(rates))
    assert rates.max() == pytest.approx(peak, rel=1e-3)
    assert rates[0] < peak / 5  # a warm-up
    assert np.all(np.diff(rates[: top + 1]) > 0) and np.all(np.diff(rates[top:]) <= 1e-12)
    assert rates[-1] < peak / 100
    # Cosine warms up for one epoch, one-cycle for 30% of the run.
    assert top * 10 == (steps if schedule == "cosine" else int(0.3 * steps * epochs))
    assert learning_rate_schedule("plateau", peak, steps, epochs) == peak


def test_a_scheduled_run_logs_its_rate_and_skips_the_plateau_rule():
    from training.fit.fitting import LearningRateLog, build_callbacks

    config = TrainConfig(lr_schedule="one-cycle")
    kinds = [type(callback).__name__ for callback in build_callbacks(config, True, scheduled=True)]
    assert kinds == [LearningRateLog.__name__, "EarlyStopping"]
    kinds = [type(callback).__name__ for callback in build_callbacks(config, True)]
    assert kinds == ["ReduceLROnPlateau", "EarlyStopping"]


def test_augmentation_flips_rotates_and_keeps_the_shape():
    import numpy as np

    from training.data.pipelines import Augmentation, build_augmenter

    image = np.zeros((1, 28, 28, 1), dtype="float32")
    image[0, 10:18, 2:8] = 255.0  # a block on the left
    batch = np.repeat(image, 64, axis=0)
    flipped = np.asarray(build_augmenter(0, Augmentation(0, 0, 0, True))(batch, training=True))
    on_right = flipped[:, :, 14:].sum(axis=(1, 2, 3)) > 0
    assert flipped.shape == batch.shape and 0 < on_right.mean() < 1  # some flipped, some not
    assert np.array_equal(flipped[~on_right], batch[~on_right])
    rotated = np.asarray(build_augmenter(0, Augmentation(0, 0, 30, False))(batch, training=True))
    assert rotated.shape == batch.shape and not np.array_equal(rotated, batch)
    unchanged = build_augmenter(0, Augmentation(0, 0, 0, False))(batch, training=True)
    assert np.array_equal(np.asarray(unchanged), batch)
