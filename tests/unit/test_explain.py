"""The map as answers and images show it (service/core/explain.py): the explain values a request
may give, the upsampled map lying over the part of the image it covers, the overlay's size and
colours, and the map carried through the batching hop with the other outputs."""

import io

import numpy as np
import pytest
from PIL import Image

from service.core import explain
from service.core.classifier import ModelOutputs
from service.core.contract import ModelContract
from service.core.postprocessing import Answers, calibrated_predictions
from service.core.preprocessing import ImageSpec
from tests.helpers import encode_image

CONTRACT = ModelContract(
    name="m",
    version="1",
    labels=("a", "b", "c"),
    image=ImageSpec(28, 28, 1),
    cam_output_name="cam",
    cam_shape=(4, 4),
    ood_output_name="ood_score",
    ood_threshold=2.0,
)


def corner_map() -> np.ndarray:
    """A 4x4 map whose only hot cell is the top-right corner."""
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[0, 3] = 1.0
    return cam


@pytest.mark.parametrize(
    ("raw", "mode"),
    [(None, ""), ("", ""), ("0", ""), ("false", ""), ("1", "map"), ("true", "map"),
     ("MAP", "map"), ("png", "png"), (" png ", "png")],
)  # fmt: skip
def test_explain_values(raw, mode):
    assert explain.explain_mode(raw) == mode


@pytest.mark.parametrize("raw", ["2", "yes please", "gif", "pngx"])
def test_other_explain_values_are_refused_with_the_accepted_ones(raw):
    with pytest.raises(explain.ExplainError, match="0, 1 .* or png"):
        explain.explain_mode(raw)


def test_the_upsampled_map_lies_over_the_part_of_the_image_its_cell_covers():
    heat = explain.upsample(corner_map(), (200, 100))  # width 200, height 100
    assert heat.shape == (100, 200)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    peak_row, peak_col = np.unravel_index(heat.argmax(), heat.shape)
    assert peak_row < 25 and peak_col >= 150  # the top-right quarter of a 4x4 grid's cell
    assert heat[75:, :100].max() == 0.0  # far from the hot cell nothing is tinted


def test_the_overlay_is_the_image_size_tinted_only_where_the_map_is_hot():
    image = Image.new("RGB", (120, 80), (100, 100, 100))
    drawn = np.asarray(explain.overlay(image, corner_map()))
    assert drawn.shape == (80, 120, 3)
    assert (drawn[60:, :40] == 100).all()  # the cold corner shows the image unchanged
    assert np.abs(drawn[5, 115].astype(int) - 100).max() > 50  # the hot corner is coloured


def test_a_large_image_gets_an_overlay_at_most_1024_pixels_long():
    data = encode_image(np.zeros((1500, 3000, 3), dtype=np.uint8), "PNG")
    png = explain.overlay_png(data, corner_map())
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (1024, 512)


def test_a_grey_model_input_gets_a_colour_overlay_of_its_own_size():
    png = explain.pixels_overlay_png(np.zeros((28, 28, 1), dtype=np.uint8), corner_map())
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.size == (28, 28) and decoded.mode == "RGB"


def test_the_map_crosses_the_batching_hop_with_the_logits_and_the_scores():
    rng = np.random.default_rng(0)
    outputs = ModelOutputs(
        rng.normal(size=(5, 3)).astype(np.float32),
        rng.random(5).astype(np.float32),
        rng.random((5, 4, 4)).astype(np.float32),
    )
    stacked = outputs.stacked()
    assert stacked.shape == (5, 3 + 1 + 16)
    back = ModelOutputs.from_stacked(stacked, CONTRACT)
    for name in ("logits", "ood_scores", "cams"):
        np.testing.assert_array_equal(getattr(back, name), getattr(outputs, name))


def test_answers_show_the_map_only_when_explained():
    rng = np.random.default_rng(1)
    cams = rng.random((2, 4, 4)).astype(np.float32)
    predictions = calibrated_predictions(
        rng.normal(size=(2, 3)).astype(np.float32), np.zeros(2, np.float32), CONTRACT, cams
    )
    answers = Answers.rank(predictions, CONTRACT, 2)
    plain = answers.to_dicts()
    assert all("cam" not in answer and "overlay_png" not in answer for answer in plain)
    explained = answers.explained().to_dicts()
    for answer, cam in zip(explained, cams, strict=True):
        assert np.allclose(answer["cam"], cam, atol=1e-3)
        assert {key: value for key, value in answer.items() if key != "cam"} in plain
    with_images = answers.explained([b"\x89PNG one", b"\x89PNG two"]).to_dicts()
    assert with_images[1]["overlay_png"] == "iVBORyB0d28="  # base64 of the second image's bytes


def test_a_model_without_a_map_says_why_when_asked_for_one():
    contract = ModelContract(
        name="m", version="1", labels=("a", "b"), image=ImageSpec(8, 8, 1),
        cam_left_out="the head is not global average pooling followed by one linear layer",
    )  # fmt: skip
    predictions = calibrated_predictions(np.zeros((1, 2), np.float32), None, contract)
    with pytest.raises(explain.ExplainError, match="m:1 has no class activation map.*head is not"):
        Answers.rank(predictions, contract, 1).explained()
