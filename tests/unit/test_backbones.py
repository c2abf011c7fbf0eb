"""Pretrained backbones without the internet: each one built with --weights none, loaded from a
weights file the test writes, frozen and unfrozen as the two phases need, and exported through
the parity gate on images whose features differ (random weights alone give every image the same
features, and a parity check that cannot fail)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from service.core.contract import ModelContract
from service.core.preprocessing import ImageSpec
from training.config import BACKBONE_CHOICES, ConfigError, TrainConfig

BACKBONE_NAMES = BACKBONE_CHOICES[1:]


def test_the_cli_choices_are_the_backbones_built():
    from training.model.backbones import BACKBONES

    assert BACKBONE_CHOICES[0] == "cnn"
    assert set(BACKBONE_NAMES) == set(BACKBONES)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backbone": "mobilenet_v3_small", "image_size": 16}, "--image-size must be at least 32"),
        ({"backbone": "efficientnet_b0", "distribute": "mirrored"}, "--distribute trains"),
        ({"fine_tune_layers": -1}, "--fine-tune-layers"),
        ({"fine_tune_learning_rate": 0}, "--fine-tune-learning-rate"),
        ({"fine_tune_epochs": 0}, "--fine-tune-epochs"),
    ],
)
def test_backbone_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_phase_2_epochs_follow_the_options():
    assert TrainConfig().phase_2_epochs == 0  # the CNN has one phase
    backbone = TrainConfig(backbone="mobilenet_v3_small", epochs=4)
    assert backbone.phase_2_epochs == 4
    assert TrainConfig(backbone="mobilenet_v3_small", fine_tune_epochs=2).phase_2_epochs == 2
    assert TrainConfig(backbone="mobilenet_v3_small", fine_tune_layers=0).phase_2_epochs == 0


def colour_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour images, raw 0-255, ``(count, size, size, 3)`` float32."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR)) for tile in small]
    ).astype(np.float32)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict:
    """One stand-in weights file per backbone, written by saving a freshly built backbone."""
    import keras

    from benchmarks.stand_in_weights import write_stand_in_weights

    keras.utils.set_random_seed(0)

    folder = tmp_path_factory.mktemp("weights")
    images = colour_images(16, 64)
    return {
        name: write_stand_in_weights(name, images, folder / f"{name}.weights.h5")
        for name in BACKBONE_NAMES
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_each_backbone_builds_without_weights_and_takes_raw_pixels(name):
    import keras

    from training.model.backbones import build_backbone_model, freeze_backbone

    grey = build_backbone_model(name, ImageSpec(32, 32, 1), 4, weights=None)
    assert tuple(grey.input.shape) == (None, 32, 32, 1)
    assert tuple(grey.output.shape) == (None, 4)
    assert isinstance(grey.get_layer("grey_to_rgb"), keras.layers.Concatenate)
    colour = build_backbone_model(name, ImageSpec(64, 64, 3), 4, weights=None)
    assert "grey_to_rgb" not in [layer.name for layer in colour.layers]
    # The backbone's own input scaling is inside the graph: raw 0-255 pixels go in.
    first = [type(layer).__name__ for layer in colour.get_layer("backbone").layers[:4]]
    assert "Rescaling" in first
    freeze_backbone(colour)
    assert {weight.path.split("/")[0] for weight in colour.trainable_weights} == {"logits"}


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_a_local_weights_file_is_loaded(name, weight_files):
    from training.model.backbones import BACKBONES, build_backbone_model

    expected = BACKBONES[name].create((64, 64, 3), None)
    expected.load_weights(weight_files[name])
    model = build_backbone_model(name, ImageSpec(64, 64, 3), 3, weights=str(weight_files[name]))
    loaded = model.get_layer("backbone").get_weights()
    assert len(loaded) == len(expected.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(loaded, expected.get_weights(), strict=True))
    fresh = build_backbone_model(name, ImageSpec(64, 64, 3), 3, weights=None)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(fresh.get_layer("backbone").get_weights(), loaded, strict=True)
    )


@pytest.mark.slow
def test_a_weights_file_of_another_backbone_is_refused_in_one_line(weight_files):
    from training.model.backbones import WeightsError, build_backbone_model

    with pytest.raises(WeightsError) as raised:
        build_backbone_model(
            "efficientnet_b0", ImageSpec(64, 64, 3), 3, str(weight_files["mobilenet_v3_small"])
        )
    assert "does not fit efficientnet_b0" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_weights_file_names_the_fix(tmp_path):
    from training.model.backbones import WeightsError, resolve_weights

    with pytest.raises(WeightsError, match="fetch-weights --backbone efficientnet_b0"):
        resolve_weights("efficientnet_b0", str(tmp_path / "missing.weights.h5"))
    assert resolve_weights("efficientnet_b0", "none") is None


@pytest.mark.slow
def test_fine_tuning_unfreezes_the_top_layers_but_never_batch_normalization():
    import keras

    from training.model.backbones import build_backbone_model, freeze_backbone, unfreeze_top

    model = build_backbone_model("mobilenet_v3_small", ImageSpec(32, 32, 3), 3, weights=None)
    freeze_backbone(model)
    base = model.get_layer("backbone")
    assert not any(layer.trainable for layer in base.layers if layer.weights)
    unfreeze_top(model, 25)
    trainable = [position for position, layer in enumerate(base.layers) if layer.trainable]
    assert trainable and min(trainable) >= len(base.layers) - 25
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
    assert any(isinstance(base.layers[position], keras.layers.Conv2D) for position in trainable)
    # Frozen BatchNormalization normalises with its moving statistics even in training mode.
    images = colour_images(4, 32)
    assert np.allclose(model(images, training=True), model(images, training=False), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_each_backbone_exports_through_the_parity_gate(name, weight_files):
    import keras
    import onnx

    from training.export.convert import convert_to_onnx
    from training.export.gate import PARITY_MAX_ABS_DIFF, gate
    from training.model.backbones import build_backbone_model

    keras.utils.set_random_seed(0)
    spec = ImageSpec(64, 64, 3)
    model = build_backbone_model(name, spec, 3, weights=str(weight_files[name]))
    # A head that spreads the features over the classes, so that probabilities differ per image,
    # at the scale of a trained one (logits of a few units, not tens).
    head = model.get_layer("logits")
    scale = 3 / np.sqrt(head.kernel.shape[0])
    kernel = np.random.default_rng(1).normal(0, scale, head.kernel.shape).astype(np.float32)
    head.set_weights([kernel, np.zeros(3, np.float32)])
    contract = ModelContract(
        name="photos",
        version="20261125-000000",
        labels=("a", "b", "c"),
        image=spec,
        opset=17,
        metrics={},
        data_source="generated",
        data_fingerprint="00" * 32,
    )
    proto = convert_to_onnx(model, contract)
    inputs = colour_images(24, 64, seed=3)
    report = gate(proto, model, inputs)
    assert report["parity"]["passed"]
    assert report["parity"]["max_abs_diff"] <= PARITY_MAX_ABS_DIFF
    probabilities = np.asarray(model(inputs, training=False))
    assert np.ptp(probabilities, axis=0).max() > 0.05, "images alike: the check would be vacuous"
    operators = collections.Counter(node.op_type for node in proto.graph.node)
    assert operators["Transpose"] <= 2, operators  # tf2onnx's transpose pass ran to the end
    assert (
        ModelContract.read_from_onnx(onnx.load_from_string(proto.SerializeToString())) == contract
    )


def test_the_kubernetes_backbone_job_reads_its_weights_from_a_read_only_volume():
    from pathlib import Path

    import yaml

    from service.core.options import config_from_args
    from training.cli import build_parser

    patch = yaml.safe_load(
        (
            Path(__file__).resolve().parents[2] / "k8s" / "training-backbone" / "job-patch.yaml"
        ).read_text()
    )
    (args,) = [op["value"] for op in patch if op["path"].endswith("/args")]
    config = config_from_args(build_parser().parse_args(args), TrainConfig)
    assert config.uses_backbone and config.weights.startswith("/weights/")
    assert config.weights.endswith(f"{config.backbone}.weights.h5")
    mounts = {op["value"]["mountPath"]: op["value"] for op in patch if "volumeMounts" in op["path"]}
    assert mounts["/weights"]["readOnly"] and mounts[config.data]["readOnly"]


def test_the_plots_mark_where_fine_tuning_starts():
    from training.quality.plots import fine_tuning_start

    assert fine_tuning_start({"loss": [1.0, 0.5]}) is None
    assert fine_tuning_start({"phase": ["head", "head", "head", "fine_tune"]}) == 4
