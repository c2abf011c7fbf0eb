"""Hostile and malformed input, below HTTP: the decode limits, the wire formats' type checks, the
detector failing closed, and label names that could leave their folder. The same probes against a
real ``bentoml serve`` are in tests/integration/test_hostile_input.py."""

from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from service.core.capture_layout import is_safe_name
from service.core.contract import ModelContract
from service.core.postprocessing import calibrated_predictions
from service.core.preprocessing import (
    DEFAULT_MAX_DECODED_BYTES,
    ImageError,
    ImageSpec,
    decoded_bytes,
    inspect_image,
    preprocess_bytes,
    to_model_input,
)
from service.http import decoding, oip
from service.http.bodies import MAX_JSON_DEPTH, parse_json
from service.http.errors import ApiError
from tests.helpers import encode_image

SPEC = ImageSpec(28, 28, 1)


def png(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", **save)
    return buffer.getvalue()


def contract(**overrides) -> ModelContract:
    values = {
        "name": "m",
        "version": "1",
        "labels": ("a", "b", "c"),
        "image": SPEC,
        "ood_threshold": 10.0,
        "ood_output_name": "ood",
    }
    return ModelContract(**{**values, **overrides})


def test_a_small_file_of_a_huge_image_is_refused_from_its_header():
    data = png(np.zeros((6300, 6300, 4), np.uint8))  # 154 KB; 159 MB to decode
    assert len(data) < 200_000
    image = Image.open(io.BytesIO(data))
    # Its pixels, and the premultiplied copy a resize makes of an image with alpha.
    assert decoded_bytes(image, SPEC) == 6300 * 6300 * 8 > DEFAULT_MAX_DECODED_BYTES
    with pytest.raises(ImageError) as refused:
        inspect_image(data, spec=SPEC)
    assert refused.value.code == "image_too_large" and "bytes to decode" in refused.value.detail
    # The same pixels in one byte each are within the limit.
    assert inspect_image(png(np.zeros((6300, 6300), np.uint8)), spec=SPEC)[0].size == (6300, 6300)


def test_conversions_and_decoders_count_in_the_cost():
    side = 2000
    palette = Image.new("P", (side, side))
    palette.info["transparency"] = 0
    # P (1 byte), its RGBA conversion (4) and the premultiplied copy (4).
    assert decoded_bytes(palette, SPEC) == side * side * 9
    grey = Image.new("L", (side, side))
    assert decoded_bytes(grey, SPEC) == side * side
    assert decoded_bytes(grey, ImageSpec(28, 28, 3)) == side * side * 5  # converted to RGB
    progressive = encode_image(np.full((side, side, 3), 90, np.uint8), "JPEG", progressive=True)
    baseline = encode_image(np.full((side, side, 3), 90, np.uint8), "JPEG")
    _, progressive_cost = inspect_image(progressive, spec=SPEC)
    _, baseline_cost = inspect_image(baseline, spec=SPEC)
    # A progressive JPEG keeps the whole image's coefficients, whatever the draft scale.
    assert progressive_cost >= baseline_cost + 2 * side * side * 3


def test_only_the_documented_formats_are_read():
    buffer = io.BytesIO()
    Image.new("RGBA", (256, 256)).save(buffer, "ICO")  # ICO decodes its image in the header
    with pytest.raises(ImageError) as refused:
        inspect_image(buffer.getvalue(), spec=SPEC)
    assert refused.value.code == "not_an_image"
    buffer = io.BytesIO()
    photo = Image.new("RGB", (640, 480), (90, 90, 90))
    photo.save(buffer, "MPO", save_all=True, append_images=[photo])  # a phone's multi-picture
    image = inspect_image(buffer.getvalue(), spec=SPEC)[0]
    assert image.format == "MPO" and image.size == (80, 60)  # drafted like a JPEG


def test_a_jpeg_is_checked_at_the_size_it_decodes_at():
    photo = encode_image(np.full((4000, 6000, 3), 90, np.uint8), "JPEG")
    image = inspect_image(photo, spec=SPEC)[0]  # drafted to 1/8: 750x500
    assert image.size == (750, 500) and decoded_bytes(image) < DEFAULT_MAX_DECODED_BYTES


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_at_the_models_size_as_on_the_full_image(mode):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode != "RGBA":
        image = image.convert(mode)
    for spec in (SPEC, ImageSpec(28, 28, 3)):
        rgba = image.convert("RGBA")
        full = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        expected = np.asarray(
            full.convert("L" if spec.channels == 1 else "RGB").resize((28, 28), Image.BILINEAR)
        ).reshape(spec.shape)
        got = to_model_input(image, spec)
        # Equal to a rounding: Pillow resizes with alpha premultiplied.
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_pillow_cannot_flood_the_log_with_a_large_exif_block(caplog):
    corrupt = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(40_000)
    data = png(np.zeros((28, 28, 3), np.uint8), exif=corrupt)
    decoding.quiet_pillow()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        preprocess_bytes(data, SPEC)
    assert [record for record in caplog.records if record.name.startswith("PIL")] == []
    assert shown == []


def infer(data, datatype="UINT8", shape=(1, 28, 28, 1), **extra) -> bytes:
    tensor = {"name": "image", "datatype": datatype, "shape": list(shape), "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


PIXELS = [0] * 784


@pytest.mark.parametrize(
    ("body", "header_length", "code"),
    [
        (infer([300] * 784), None, "invalid_data"),
        (infer([-1] * 784), None, "invalid_data"),
        (infer([1.5] * 784), None, "invalid_data"),  # UINT8 must be whole
        (infer([3e38] * 784, "FP32"), None, "invalid_data"),
        (infer(["1"] * 784, "FP32"), None, "invalid_data"),
        (infer([True] * 784), None, "invalid_data"),
        (infer([None] * 784), None, "invalid_data"),
        (infer(PIXELS, shape=(True, 28, 28, 1)), None, "invalid_shape"),
        (infer(PIXELS, parameters=[1]), None, "invalid_parameters"),
        (infer(PIXELS, parameters="binary"), None, "invalid_parameters"),
        (infer(PIXELS, outputs=[{"name": "probabilities", "parameters": []}]), None,
         "invalid_parameters"),
        (infer(PIXELS, parameters={"binary_data_output": "yes"}), None, "invalid_parameters"),
        (json.dumps({"inputs": [{"name": "image", "datatype": ["UINT8"], "shape": [1, 28, 28, 1],
                                 "data": PIXELS}]}).encode(), None, "invalid_datatype"),
        (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                                 "data": PIXELS, "parameters": ["x"]}]}).encode(), None,
         "invalid_parameters"),
        (infer(PIXELS, id={"nested": 1}), None, "invalid_id"),
        (b"[" * 100_000 + b"]" * 100_000, None, "json_too_deep"),
        (infer(PIXELS), "\u00b2", "invalid_header"),  # a Unicode digit
        (infer(PIXELS), "99999999999999999999", "invalid_header"),
    ],
)  # fmt: skip
def test_every_malformed_infer_request_is_a_400_with_its_code(body, header_length, code):
    with pytest.raises(ApiError) as refused:
        oip.decode_request(body, header_length, contract(), 64)
    assert refused.value.status == 400 and refused.value.code == code


def test_a_well_formed_request_still_passes_nested_or_flat():
    flat = oip.decode_request(infer(PIXELS), None, contract(), 64)
    nested = [[[[0] for _ in range(28)] for _ in range(28)]]
    assert np.array_equal(
        oip.decode_request(infer(nested), None, contract(), 64).images, flat.images
    )
    assert flat.images.dtype == np.uint8


def test_json_is_parsed_only_within_its_depth():
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, "it")
    with pytest.raises(ApiError) as refused:
        parse_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "it")
    assert refused.value.code == "json_too_deep"
    with pytest.raises(ApiError) as refused:
        parse_json(b'{"a": NaN', "it")
    assert refused.value.code == "invalid_json"


def test_the_detector_fails_closed_on_scores_that_are_not_numbers():
    logits = np.array([[1.0, 2.0, 3.0], [np.inf, 0.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    scores = np.array([1.0, 1.0, np.nan], np.float32)
    predictions = calibrated_predictions(logits, scores, contract())
    assert predictions.unknown.tolist() == [False, True, True]
    assert np.isfinite(predictions.probabilities).all()
    assert np.isfinite(predictions.ood_scores).all()
    # Without a detector, broken logits are flagged all the same.
    alone = calibrated_predictions(logits, None, contract(ood_output_name=""))
    assert alone.unknown.tolist() == [False, True, False]
    json.dumps(predictions.probabilities.tolist(), allow_nan=False)


@pytest.mark.parametrize(
    "label", ["..", ".", " ..", "a/b", "/abs", "a\\b", "a\x00b", ".hidden", "C:", "c:x", "nul",
              "COM1.txt", " padded", "padded ", "tab\there", ""],
)  # fmt: skip
def test_a_label_that_is_not_one_plain_folder_name_is_unsafe(label):
    assert not is_safe_name(label)


@pytest.mark.parametrize("label", ["cat", "new class", "éléphant", "zebra-2", "a.b"])
def test_ordinary_labels_are_safe(label):
    assert is_safe_name(label)
