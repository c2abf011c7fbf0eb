"""The service's settings (model source and worker rule included) and the predict CLI derived
from its typed config."""

import pytest

from service.options import config_from_args
from service.predict import WRITERS, PredictConfig, build_parser
from service.preprocessing import RESIZE_METHODS
from service.settings import ServiceSettings, available_cpus
from training.__main__ import build_train_parser


def test_settings_read_the_model_source_and_counts_from_the_environment():
    settings = ServiceSettings.from_env(
        {"MODEL_PATH": "/models/pets", "WORKERS": "3", "BATCHING": "yes", "MODEL_NAME": "pets"}
    )
    assert (settings.model_path, settings.workers, settings.batching) == ("/models/pets", 3, "on")
    assert settings.api_workers == 3
    assert settings.model_reference == "pets:latest"
    assert ServiceSettings(model_tag="pets:v2").model_reference == "pets:v2"
    assert ServiceSettings().model_reference == "animals:latest"


def test_the_worker_rule_follows_the_cpus_this_process_may_use():
    assert ServiceSettings().api_workers == available_cpus()
    assert ServiceSettings().onnx_threads(available_cpus()) == 1
    assert ServiceSettings().onnx_threads(1) == available_cpus()


def test_a_setting_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="WORKERS='two' is not a whole number"):
        ServiceSettings.from_env({"WORKERS": "two"})


def test_the_predict_cli_is_derived_from_its_config():
    args = build_parser().parse_args(["a.png", "photos", "--format", "csv", "--top-k", "5"])
    config = config_from_args(args, PredictConfig)
    assert [str(path) for path in config.inputs] == ["a.png", "photos"]
    assert (config.format, config.top_k, config.model) == ("csv", 5, None)
    defaults = config_from_args(build_parser().parse_args(["x"]), PredictConfig)
    assert defaults == PredictConfig(inputs=defaults.inputs)


def test_option_choices_come_from_the_definitions_they_name():
    formats = next(a for a in build_parser()._actions if a.dest == "format")
    assert tuple(formats.choices) == tuple(WRITERS)
    resize = next(a for a in build_train_parser()._actions if a.dest == "resize_method")
    assert tuple(resize.choices) == tuple(RESIZE_METHODS)
