"""The shared preprocessing function: formats, channels, size, orientation, and bad input."""

import io

import numpy as np
import pytest
from PIL import Image

from service.core.preprocessing import (
    ImageError,
    ImageSpec,
    decode_image,
    preprocess_array,
    preprocess_bytes,
    to_model_input,
)
from tests.helpers import encode_image

GREY = ImageSpec(height=28, width=28, channels=1)
COLOUR = ImageSpec(height=32, width=32, channels=3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
@pytest.mark.parametrize("colour", [False, True])
def test_every_format_and_mode_becomes_the_model_shape(fmt, colour):
    pixels = np.full((50, 70, 3) if colour else (50, 70), 200, dtype=np.uint8)
    for spec in (GREY, COLOUR):
        out = preprocess_bytes(encode_image(pixels, fmt), spec)
        assert out.shape == spec.shape
        assert out.dtype == np.uint8


def test_grey_to_colour_copies_the_grey_level_into_each_channel():
    out = preprocess_bytes(encode_image(np.full((8, 8), 123, np.uint8), "PNG"), ImageSpec(8, 8, 3))
    assert (out == 123).all()


def test_raw_pixels_are_not_scaled():
    # Scaling lives in the model graph; preprocessing must hand over raw 0-255 values.
    pixels = np.zeros((28, 28), np.uint8)
    pixels[0, 0] = 255
    out = preprocess_bytes(encode_image(pixels, "PNG"), GREY)
    assert out.max() == 255 and out.min() == 0


def test_animated_gif_uses_its_first_frame():
    frames = [Image.fromarray(np.full((10, 10), value, np.uint8)) for value in (10, 250)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess_bytes(buffer.getvalue(), ImageSpec(10, 10, 1))
    assert abs(int(out.mean()) - 10) <= 2


def test_exif_orientation_is_applied():
    # A 40 wide x 20 high JPEG tagged "rotate 90" (orientation 6) is 20 wide x 40 high upright.
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).size == (20, 40)


def test_transparent_pixels_become_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    assert (preprocess_bytes(buffer.getvalue(), ImageSpec(4, 4, 1)) == 0).all()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"this is not an image at all", "not_an_image"),
        (encode_image(np.zeros((64, 64), np.uint8), "PNG")[:60], "corrupt_image"),
    ],
)
def test_bad_bytes_raise_the_projects_image_error(data, code):
    with pytest.raises(ImageError) as caught:
        preprocess_bytes(data, GREY)
    assert caught.value.code == code


def test_pixel_count_limit_refuses_decompression_bombs():
    data = encode_image(np.zeros((300, 300), np.uint8), "PNG")
    with pytest.raises(ImageError) as caught:
        preprocess_bytes(data, GREY, max_pixels=300 * 300 - 1)
    assert caught.value.code == "image_too_large"
    assert preprocess_bytes(data, GREY, max_pixels=300 * 300).shape == GREY.shape


def test_arrays_at_model_size_pass_through_and_others_take_the_file_path():
    pixels = np.random.default_rng(0).integers(0, 255, (28, 28, 1), dtype=np.uint8)
    assert preprocess_array(pixels, GREY) is pixels
    larger = np.random.default_rng(1).integers(0, 255, (56, 56), dtype=np.uint8)
    from_array = preprocess_array(larger, GREY)
    from_file = preprocess_bytes(encode_image(larger, "PNG"), GREY)
    np.testing.assert_array_equal(from_array, from_file)


def test_spec_refuses_impossible_values_and_round_trips():
    with pytest.raises(ValueError):
        ImageSpec(28, 28, 2)
    with pytest.raises(ValueError):
        ImageSpec(28, 28, 1, resize_method="magic")
    spec = ImageSpec(28, 30, 3, "nearest")
    assert ImageSpec.from_dict(spec.to_dict()) == spec


def test_a_header_claiming_billions_of_pixels_is_too_large_not_a_crash():
    # Found by the property tests: Pillow refuses such a header inside Image.open already.
    header = encode_image(np.zeros((2, 2), np.uint8), "BMP")
    bomb = header[:18] + (60000).to_bytes(4, "little") + (60000).to_bytes(4, "little") + header[26:]
    with pytest.raises(ImageError) as caught:
        preprocess_bytes(bomb, GREY)
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize("channels", [1, 3])
def test_a_photo_is_decoded_at_reduced_scale_and_agrees_with_a_full_decode(channels):
    from sklearn.datasets import load_sample_image

    photo = encode_image(load_sample_image("china.jpg"), "JPEG", quality=90)  # 640x427
    spec = ImageSpec(28, 28, channels)
    reduced = decode_image(photo, spec=spec)
    assert reduced.size == (80, 54)  # 1/8 scale still holds 28x28
    assert decode_image(photo, spec=ImageSpec(300, 300, channels)).size == (640, 427)
    full = to_model_input(decode_image(photo), spec).astype(int)
    drafted = preprocess_bytes(photo, spec).astype(int)
    assert drafted.shape == full.shape == spec.shape
    assert np.abs(drafted - full).mean() < 4  # grey levels of 255
