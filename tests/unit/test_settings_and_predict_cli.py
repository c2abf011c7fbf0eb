"""The service's settings (model source and worker rule included) and the predict CLI derived
from its typed config."""

import pytest

from service.cli.config import PredictConfig, build_parser
from service.cli.writers import WRITERS
from service.core.classifier import available_cpus
from service.core.options import config_from_args
from service.http.settings import ServiceSettings
from training.cli import build_parser as build_training_parser


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


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"DRIFT_WINDOW": "-5"}, "DRIFT_WINDOW=-5"),
        ({"DRIFT_WINDOW": str(10**9)}, "a window of up to 100000"),  # memory bounded
        ({"DRIFT_ALPHA": "1.5"}, "DRIFT_ALPHA=1.5"),
    ],
)
def test_a_drift_setting_out_of_range_is_named(environ, named):
    with pytest.raises(ValueError, match=named):
        ServiceSettings.from_env(environ)


def test_the_predict_cli_is_derived_from_its_config():
    args = build_parser().parse_args(["a.png", "photos", "--format", "csv", "--top-k", "5"])
    config = config_from_args(args, PredictConfig)
    assert [str(path) for path in config.inputs] == ["a.png", "photos"]
    assert (config.format, config.top_k, config.model) == ("csv", 5, None)
    defaults = config_from_args(build_parser().parse_args(["x"]), PredictConfig)
    assert defaults == PredictConfig(inputs=defaults.inputs)


def test_every_format_choice_writes_rows_a_reader_reads_back():
    import csv
    import io
    import json

    formats = next(a for a in build_parser()._actions if a.dest == "format")
    row = {
        "path": "cats/a.png",
        "label": "cat",
        "score": 0.9,
        "top_k": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}],
        "unknown": False,
        "ood_score": 1.5,
        "error": None,
    }
    for name in formats.choices:
        stream = io.StringIO()
        WRITERS[name](stream, width=12).write([row])
        text = stream.getvalue()
        if name == "csv":
            (read,) = csv.DictReader(io.StringIO(text))
            assert (read["path"], read["label"], read["top_k"]) == (
                "cats/a.png",
                "cat",
                "cat:0.900000;dog:0.100000",
            )
        elif name == "jsonl":
            assert json.loads(text) == row
        else:
            assert text.splitlines()[1].split()[:3] == ["cats/a.png", "cat", "0.900"]


def test_every_resize_choice_resizes_to_the_model_input():
    import numpy as np

    from service.core.preprocessing import ImageSpec, preprocess_array

    resize = next(a for a in build_training_parser()._actions if a.dest == "resize_method")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    results = {}
    for method in resize.choices:
        results[method] = preprocess_array(pixels, ImageSpec(28, 28, 1, method))
        assert results[method].shape == (28, 28, 1)
    # They are different methods, not one under several names.
    assert len({result.tobytes() for result in results.values()}) == len(resize.choices)


def test_a_model_folder_that_cannot_be_read_is_one_line_not_a_traceback(tmp_path, capsys):
    """A path the OS refuses to look at (here a name too long; for another user, a folder it may
    not read) is a one-line error naming it, for the service and the CLI alike."""
    from service.cli.classify import main
    from service.core.classifier import ModelLoadError, ModelSource, load_classifier

    unreadable = tmp_path / ("x" * 300)
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_classifier(ModelSource(unreadable, "MODEL_PATH"))
    (tmp_path / "a.png").write_bytes(b"")
    assert main([str(tmp_path / "a.png"), "--model", str(unreadable)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "cannot be read" in line
