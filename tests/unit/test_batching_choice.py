"""BATCHING=auto: the documented rule, the values BATCHING takes, and the decision handed from
the process that measured the model to the workers it starts."""

from __future__ import annotations

import pytest

from service import batching
from service.batching import ModelCost


@pytest.mark.parametrize(
    ("cost", "enabled"),
    [
        (ModelCost(0.45, 0.43), False),  # the CNN: cheap, and no cheaper in a batch
        (ModelCost(5.6, 4.8), False),  # MobileNetV3-Small on one CPU thread: ratio 0.86
        (ModelCost(5.6, 2.8), True),  # a batch halves the cost per image
        (ModelCost(0.8, 0.1), False),  # batches well, but the hop costs more than the model
        (ModelCost(1.0, 0.5), True),  # both bounds are inclusive
    ],
)
def test_the_rule_turns_batching_on_only_where_a_batch_pays(cost, enabled):
    assert batching.choose(cost) is enabled


@pytest.mark.parametrize(
    ("value", "mode"), [("1", "on"), ("yes", "on"), ("ON", "on"), ("0", "off"), ("auto", "auto")]
)
def test_batching_values(value, mode):
    assert batching.parse(value) == mode


def test_an_unknown_batching_value_names_the_choices():
    with pytest.raises(ValueError, match="use on, off or auto"):
        batching.parse("sometimes")


@pytest.mark.slow
def test_auto_measures_the_real_model_once_and_hands_the_decision_to_the_workers(offline):
    environ: dict[str, str] = {}
    enabled = batching.resolve("auto", lambda: offline, environ)
    # The tiny CNN on onnxruntime: well under a millisecond, no cheaper in a batch.
    assert enabled is False and environ["BATCHING"] == "off"
    one, eight = (float(value) for value in environ["BATCHING_MEASURED"].split(","))
    assert batching.choose(ModelCost(one, eight)) is enabled
    described = batching.describe(environ["BATCHING"], enabled, environ)
    assert described["setting"] == "auto"
    assert described["measured"] == {"batch_1_ms": one, "batch_8_ms_per_image": eight}
    # A worker reads the decision from its environment and never measures again.
    assert batching.resolve(environ["BATCHING"], lambda: pytest.fail("measured twice")) is False


def test_auto_with_a_model_that_cannot_load_leaves_batching_off():
    def broken():
        raise FileNotFoundError("no model.onnx")

    environ: dict[str, str] = {}
    assert batching.resolve("auto", broken, environ) is False
    assert environ["BATCHING"] == "off"
    assert batching.describe("off", False, environ) == {"enabled": False, "setting": "off"}


def test_an_explicit_setting_is_obeyed_without_measuring():
    assert batching.resolve("off", lambda: pytest.fail("measured")) is False
    assert batching.resolve("1", lambda: pytest.fail("measured")) is True
