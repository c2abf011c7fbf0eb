"""What the model looked at: the class activation map (the model's ``cam`` output) as a grid of
numbers, upsampled onto the input, and as an overlay image a person can look at.

The map covers the whole model input, which is the whole image resized (preprocessing neither
crops nor pads), so upsampling it to the image's own size puts each cell over the part of the
image it saw. Only numpy and Pillow are used: the service never needs TensorFlow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.core.preprocessing import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageSpec,
    decode_image,
)

# explain=... values: no map, the map as numbers, and the map with an overlay image.
NONE, MAP, PNG = "", "map", "png"
_MODES = {"": NONE, "0": NONE, "false": NONE, "1": MAP, "true": MAP, "map": MAP, "png": PNG}
# An overlay's longer side at most (a larger input is scaled down: a 12-megapixel photo's
# overlay would cost a second to encode and megabytes to send, and shows nothing more).
MAX_OVERLAY_SIDE = 1024
# The overlay's opacity where the map is 1 (it falls to 0 where the map is 0).
MAX_OPACITY = 0.6
# The colour ramp of the map, from 0 to 1 (blue, cyan, green, yellow, red: the usual heat map,
# whose hot end shows on white as well as on black).
_RAMP = np.array(
    [[30, 60, 220], [0, 190, 230], [40, 200, 80], [250, 210, 0], [230, 20, 20]], dtype=np.float32
)
GRID_DIGITS = 3


class ExplainError(ValueError):
    """An ``explain`` value that is not one of the accepted ones, or a model with no map."""


def require_map(contract) -> None:
    """Refuse to explain with a model that has no class activation map; the one message, with
    the reason its contract gives.

    Raises:
        ExplainError: ``contract`` (a :class:`~service.core.contract.ModelContract`) has none.
    """
    if not contract.has_cam:
        reason = contract.cam_left_out or "it was exported without one"
        raise ExplainError(
            f"model {contract.tag} has no class activation map to explain with: {reason}"
        )


def explain_mode(raw: str | None) -> str:
    """``explain`` as a request gives it (absent, 0/1, true/false, map, png) -> ``NONE``,
    ``MAP`` or ``PNG``.

    Raises:
        ExplainError: any other value.
    """
    mode = _MODES.get((raw or "").strip().lower())
    if mode is None:
        raise ExplainError(
            f"explain must be 0, 1 (the map as numbers) or png (also an overlay image), not {raw!r}"
        )
    return mode


def grid(cam: np.ndarray) -> list[list[float]]:
    """One ``(h, w)`` map as rows of numbers in [0, 1], rounded for an answer."""
    return np.round(np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0), GRID_DIGITS).tolist()


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` map resized to ``size`` = ``(width, height)`` by bilinear interpolation
    (each cell's value at its centre), ``(height, width)`` float32 in [0, 1]."""
    image = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F")
    resized = image.resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB colours along the ramp, ``(..., 3)`` float32."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lower = np.minimum(position.astype(int), len(_RAMP) - 2)
    fraction = (position - lower)[..., np.newaxis]
    return _RAMP[lower] * (1 - fraction) + _RAMP[lower + 1] * fraction


def overlay(
    image: Image.Image, cam: np.ndarray, size: tuple[int, int] | None = None
) -> Image.Image:
    """``image`` in colour with the map laid over it: the hotter a part, the more it is tinted
    (transparent where the map is 0).

    Args:
        size: ``(width, height)`` of the result (default: the image's own, scaled down to a
            longer side of at most ``MAX_OVERLAY_SIDE``).
    """
    if size is None:
        scale = min(1.0, MAX_OVERLAY_SIDE / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB")
    if base.size != size:
        base = base.resize(size, Image.Resampling.BILINEAR)
    heat = upsample(cam, size)
    opacity = (MAX_OPACITY * heat)[..., np.newaxis]
    pixels = np.asarray(base, dtype=np.float32)
    blended = pixels * (1 - opacity) + colours(heat) * opacity
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


# zlib's fastest level: on the 640x427 photo's overlay it encodes in less than half the time
# of Pillow's default (6) for a file about 5% larger (BENCHMARKS.md).
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def overlay_png(
    data: bytes,
    cam: np.ndarray,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> bytes:
    """The overlay of the map on an encoded image (the bytes a client sent), as PNG, at the
    image's own size (a longer side above ``MAX_OVERLAY_SIDE`` scaled down to it).

    Raises:
        service.core.preprocessing.ImageError: the image is over the decoding limits at the
            overlay's size (it was read once already to classify it, at the model's size).
    """
    # A JPEG decodes reduced, at the overlay's own size at most (draft mode).
    side = ImageSpec(MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE, 3)
    return png_bytes(overlay(decode_image(data, max_pixels, side, max_bytes), cam))


def pixels_overlay_png(pixels: np.ndarray, cam: np.ndarray) -> bytes:
    """The overlay on a model input ``(H, W, C)`` uint8 (an input sent as a tensor)."""
    array = np.asarray(pixels, dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return png_bytes(overlay(image, cam))
