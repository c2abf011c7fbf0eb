"""BATCHING=auto: the documented rule, the values BATCHING takes, and the decision handed from
the process that measured the model to the workers it starts."""

from __future__ import annotations

import pytest

from service.http import adaptive_batching, app
from service.http.adaptive_batching import ModelCost
from service.http.settings import parse_batching


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
    assert adaptive_batching.choose(cost) is enabled


@pytest.mark.parametrize(
    ("value", "mode"), [("1", "on"), ("yes", "on"), ("ON", "on"), ("0", "off"), ("auto", "auto")]
)
def test_batching_values(value, mode):
    assert parse_batching(value) == mode


def test_an_unknown_batching_value_names_the_choices():
    with pytest.raises(ValueError, match="use on, off or auto"):
        parse_batching("sometimes")


@pytest.mark.slow
def test_auto_measures_the_real_model_once_and_hands_the_decision_to_the_workers(tiny_run):
    environ = {"MODEL_PATH": str(tiny_run["folder"]), "WORKERS": "2"}
    serving = app.start(environ)
    # The tiny CNN on onnxruntime: well under a millisecond, no cheaper in a batch.
    assert serving.batching is False and environ["BATCHING"] == "off"
    cost = adaptive_batching.measured_cost(environ)
    assert cost is not None and cost.batch_1_ms > 0
    assert adaptive_batching.choose(cost) is serving.batching
    # The serving process keeps the model it timed for its deployment check, which then does not
    # load it again.
    assert serving.loaded is not None and serving.loaded.contract.name == "tiny"
    app.refuse_unservable_model(serving)
    assert serving.loaded is None
    # A worker reads the decision from its environment and never loads or measures the model.
    worker = app.start(dict(environ))
    assert worker.batching is False and worker.loaded is None
    assert worker.batching_status["setting"] == "auto"
    assert worker.batching_status["measured"] == {
        "batch_1_ms": cost.batch_1_ms,
        "batch_8_ms_per_image": cost.batch_8_ms_per_image,
    }


def test_auto_with_a_model_that_cannot_load_leaves_batching_off_and_refuses_it_in_one_line(
    tmp_path, capsys
):
    environ = {"MODEL_PATH": str(tmp_path / "missing")}
    serving = app.start(environ)
    assert serving.batching is False and environ["BATCHING"] == "off"
    worker = app.start(dict(environ))
    assert worker.batching_status == {"enabled": False, "setting": "off"}
    with pytest.raises(SystemExit) as stopped:
        app.refuse_unservable_model(serving)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        lines[-1] == f"error: cannot serve: MODEL_PATH={tmp_path / 'missing'} is not a folder: "
        "mount or export a model"
    )


def test_an_explicit_setting_is_obeyed_without_loading_the_model(tmp_path):
    for value, enabled in (("off", False), ("1", True)):
        environ = {"MODEL_PATH": str(tmp_path / "missing"), "BATCHING": value}
        started = app.start(environ)
        assert (started.batching, started.loaded) == (enabled, None)
        assert environ["BATCHING"] == value  # nothing handed down: it was not measured
