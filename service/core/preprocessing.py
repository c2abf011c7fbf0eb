"""The one image preprocessing definition: training, export checks, the service and the CLI use it.

It turns encoded image bytes (or an in-memory array) into the model's input: an ``(H, W, C)``
``uint8`` array of raw 0-255 pixels. Pixel scaling is *not* done here: it lives inside the model
graph (``layers.Rescaling``), so it ships inside ``model.onnx`` and cannot drift.

Only numpy and Pillow are used, so the service never needs TensorFlow.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_METHODS = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}
# File suffixes of the formats above, for finding images in folders.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# 1 channel is greyscale ("L"), 3 is colour ("RGB"); alpha is dropped.
PIL_MODES = {1: "L", 3: "RGB"}
# Refuse decompression bombs before they are decoded: 40 megapixels holds a 4000x3000 photo
# with room to spare, but not a 20000x20000 PNG of a few kilobytes.
DEFAULT_MAX_PIXELS = 40_000_000
# And refuse what would take more memory than this to decode and convert (decoded_bytes: a PNG
# of 6300x6300 RGBA is under the pixel limit, and takes 159 MB, 318 MB with the copy its alpha
# needs): 128 MiB holds a 4000x4000 colour image with alpha, and a baseline JPEG photo of any
# size the pixel limit allows, which decodes reduced.
DEFAULT_MAX_DECODED_BYTES = 128 * 2**20
# The formats decoded (the error messages name them): Pillow's other readers are not offered,
# since some (ICO) decode an embedded image while the header is read, before any limit.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
# A JPEG with a multi-picture block (many phone photos) opens as MPO.
JPEG_FORMATS = ("JPEG", "MPO")
# What the pixel limit allows in any mode, with its conversions: the training job's bound, which
# reads the operator's own files, where only the service must guard its memory against what
# clients send.
PIXEL_LIMIT_BYTES = 16 * DEFAULT_MAX_PIXELS
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


class ImageError(ValueError):
    """An input could not be turned into a model input. ``code`` is a short, stable error code."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: size, channels and how images are resized to it."""

    height: int
    width: int
    channels: int
    resize_method: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in PIL_MODES:
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(
                f"resize_method must be one of {sorted(RESIZE_METHODS)}, got {self.resize_method!r}"
            )
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model input shape of one image, ``(H, W, C)``."""
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ImageSpec:
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            channels=int(data["channels"]),
            resize_method=str(data.get("resize_method", "bilinear")),
        )


def decoded_bytes(
    image: Image.Image, spec: ImageSpec | None = None, full: tuple[int, int, int] | None = None
) -> int:
    """The most memory decoding ``image`` at its (drafted) size, and turning it into the
    ``spec``'s input, holds at once: the decoded pixels in the image's own mode (one byte a pixel
    for ``1``, ``L`` and ``P``, two for 16-bit greyscale, four for every other mode: Pillow
    keeps RGB in four bytes too), plus a full-size copy for each conversion on the way (4 bytes a
    pixel: to RGBA for a palette with transparency, Pillow's premultiplied copy when it resizes
    an image with alpha, a change of mode otherwise), plus what the decoder itself keeps: two
    canvases for WebP, and for a progressive JPEG the whole image's coefficients at full size,
    whatever the draft scale (``full``: its width, height and bands before the draft)."""
    pixels = image.width * image.height
    cost = pixels * _STORAGE_BYTES.get(image.mode, 4)
    target = PIL_MODES[spec.channels] if spec is not None else image.mode
    transparent = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if transparent:
        cost += pixels * 4 * (1 if image.mode in ("RGBA", "LA") else 2)
    elif image.mode != target:
        cost += pixels * 4
    if image.format == "WEBP":
        cost += 2 * pixels * 4
    if image.format in JPEG_FORMATS and (
        image.info.get("progressive") or image.info.get("progression")
    ):
        width, height, bands = full or (*image.size, len(image.getbands()))
        cost += 2 * width * height * bands
    return cost


def inspect_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    spec: ImageSpec | None = None,
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[Image.Image, int]:
    """Read an image's header, without decoding its pixels, and check what decoding will cost.

    Given the ``spec`` it will be resized to, a JPEG is set to decode at the smallest of 1/2,
    1/4 or 1/8 scale that still holds the target size (Pillow's draft mode, a DCT-domain
    reduction): a 640x427 photo for a 28x28 input costs a fraction of a full decode, and
    training and serving, which both come here, stay identical. The limits are checked on the
    size that will be decoded: ``max_pixels`` (width x height) and ``max_bytes`` (what the
    decoded image takes in its own mode, and its conversions: :func:`decoded_bytes`).

    Returns:
        The opened image (not yet decoded) and its decoding cost in bytes.

    Raises:
        ImageError: ``empty_file``, ``not_an_image``, ``image_too_large`` or ``corrupt_image``.
    """
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes); send an image file")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own, far larger, limit
        raise ImageError("image_too_large", f"{exc}: send a smaller image") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            "not_an_image", "the file is not an image Pillow can read (PNG, JPEG, BMP, GIF, WEBP)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError("corrupt_image", f"the image header could not be read: {exc}") from exc
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageError(
            "image_too_large",
            f"the image has {image.width}x{image.height} = {pixels} pixels; the limit is "
            f"{max_pixels}: send a smaller image",
        )
    full = (*image.size, len(image.getbands()))
    if spec is not None and image.format in JPEG_FORMATS:
        # Square bound: an EXIF rotation may swap width and height after decoding.
        side = max(spec.height, spec.width)
        try:
            image.draft(PIL_MODES[spec.channels], (side, side))
        except (OSError, ValueError) as exc:
            raise ImageError("corrupt_image", f"the image header is corrupt: {exc}") from exc
    cost = decoded_bytes(image, spec, full)
    if cost > max_bytes:
        raise ImageError(
            "image_too_large",
            f"the image ({image.width}x{image.height}, mode {image.mode}) takes {cost} bytes to "
            f"decode and convert; the limit is {max_bytes}: send a smaller image",
        )
    return image, cost


def load_image(image: Image.Image) -> Image.Image:
    """Decode an image from :func:`inspect_image`: its pixels, oriented by its EXIF tag and, for
    animations, reduced to the first frame.

    Raises:
        ImageError: ``image_too_large`` or ``corrupt_image``.
    """
    try:
        image.seek(0)  # first frame of an animated GIF/WEBP
        with warnings.catch_warnings():
            # Our own limits are checked before; Pillow's warnings would only repeat them, or,
            # for a file with many odd chunks, write a line for each one.
            warnings.simplefilter("ignore")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # else a full copy, even unturned
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageError("corrupt_image", f"the image data is truncated or corrupt: {exc}") from exc
    return image


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    spec: ImageSpec | None = None,
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, BMP, GIF, WEBP, ...) into a Pillow image:
    :func:`inspect_image`, then :func:`load_image`.

    Raises:
        ImageError: ``empty_file``, ``not_an_image``, ``image_too_large`` or ``corrupt_image``.
    """
    return load_image(inspect_image(data, max_pixels, spec, max_bytes)[0])


def to_model_input(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Convert a decoded image to the model's channels and size.

    Transparency is composited onto black, the background of the built-in silhouettes, instead
    of letting Pillow keep whatever colour hides under alpha 0. It is done at the model's size:
    Pillow resizes an image with alpha premultiplied, so resizing first and compositing after
    gives the composite of the full image (to a rounding), without full-size copies of it.

    Returns:
        ``uint8`` array of shape ``(spec.height, spec.width, spec.channels)``, raw 0-255 pixels.
    """
    mode = PIL_MODES[spec.channels]
    size = (spec.width, spec.height)
    method = RESIZE_METHODS[spec.resize_method]
    if image.mode != mode and (
        image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    ):
        with_alpha = "LA" if image.mode == "LA" else "RGBA"
        if image.mode != with_alpha:
            image = image.convert(with_alpha)
        if image.size != size:
            image = image.resize(size, method)
        values = np.asarray(image, dtype=np.uint16)
        alpha = values[..., -1:]
        composite = ((values[..., :-1] * alpha + 127) // 255).astype(np.uint8)
        image = Image.fromarray(composite[..., 0] if with_alpha == "LA" else composite)
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, method)
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(spec.shape)


def preprocess_bytes(
    data: bytes,
    spec: ImageSpec,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> np.ndarray:
    """Decode image bytes and turn them into one model input of shape ``spec.shape`` (uint8)."""
    return to_model_input(decode_image(data, max_pixels, spec, max_bytes), spec)


def preprocess_array(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Turn an in-memory ``(H, W)`` or ``(H, W, C)`` uint8 image into one model input.

    Arrays already at the model's size and channels pass through unchanged; others take the same
    Pillow conversion and resize path as decoded files, so both sources agree.
    """
    pixels = np.asarray(pixels)
    if pixels.shape == spec.shape and pixels.dtype == np.uint8:
        return pixels
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    image = Image.fromarray(pixels.astype(np.uint8))
    return to_model_input(image, spec)
