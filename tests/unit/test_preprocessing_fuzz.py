"""Property tests: fed any bytes, the shared preprocessing returns a tensor of the model's shape
or raises the project's own ImageError, never anything else."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.core.preprocessing import ImageError, ImageSpec, preprocess_bytes

SPECS = [ImageSpec(28, 28, 1), ImageSpec(32, 24, 3, "nearest")]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO"]


def check(data: bytes) -> None:
    for spec in SPECS:
        try:
            out = preprocess_bytes(data, spec, max_pixels=4_000_000)
        except ImageError as error:
            assert error.code in {"empty_file", "not_an_image", "corrupt_image", "image_too_large"}
            continue
        assert out.shape == spec.shape and out.dtype == np.uint8


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    check(data)


@st.composite
def damaged_images(draw):
    """A real encoded image, then truncated, bit-flipped or with bytes inserted."""
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1"]))
    fmt = draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        image.convert("RGB").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip", "insert"]))
    if damage == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
    elif damage == "insert":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_images())
def test_damaged_real_images(data):
    check(data)
