"""One pass over the images: what each is (size, mode, format), its pixel digest, thumbnail and
perceptual hash, and which files could not be read or were not images at all."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.core.preprocessing import IMAGE_SUFFIXES, ImageError, decode_image
from training.data.duplicates import (
    CROPS,
    Duplicates,
    find_duplicates,
    phash_bits,
    pixel_digest,
    thumbnail,
)
from training.data.sources import LabelledImages

# An image is odd in size when its pixel count is this many times above or below the median...
AREA_FACTOR = 16.0
# ... or its aspect ratio (long side / short side) this many times the median one.
ASPECT_FACTOR = 2.0
# A mode is odd when fewer than this share of the images have it.
RARE_MODE_SHARE = 0.05


@dataclass
class Inventory:
    """The audited images, aligned with the :class:`LabelledImages` they came from."""

    keys: list[str]  # relative path, or "<label>/#<index>" for in-memory images
    labels: np.ndarray  # (N,) class names
    widths: np.ndarray
    heights: np.ndarray
    modes: list[str]
    formats: list[str]
    digests: list[str]
    thumbnails: np.ndarray  # (N, 32, 32) uint8
    cut_thumbnails: np.ndarray  # (N, len(CROPS), 32, 32) uint8, the image less each crop
    hashes: np.ndarray  # (N,) uint64
    unreadable: list[dict] = field(default_factory=list)  # {"file", "reason"}
    not_images: list[str] = field(default_factory=list)  # files without an image suffix

    def __len__(self) -> int:
        return len(self.keys)


def _describe(image: Image.Image, image_format: str) -> tuple:
    small = thumbnail(image)
    return (
        image.width,
        image.height,
        image.mode,
        image_format,
        pixel_digest(image),
        small,
        phash_bits(small),
        np.stack([thumbnail(image, crop) for crop in CROPS]),
    )


def _describe_file(path: str) -> tuple:
    with open(path, "rb") as handle:
        image = decode_image(handle.read())
    return _describe(image, image.format or Path(path).suffix.lstrip(".").upper())


def folder_of(images: LabelledImages) -> Path | None:
    """The data folder of a folder source, else None."""
    return Path(images.source.removeprefix("folder:")) if images.paths is not None else None


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def unreadable_files(paths: list[str], root: Path | None) -> list[dict]:
    """Each file that does not decode, with the decoder's reason."""
    found = []
    for path in paths:
        try:
            _describe_file(path)
            reason = "decoded on a second try (read error?)"
        except ImageError as exc:
            reason = f"{exc.code}: {exc.detail}"
        except OSError as exc:
            reason = f"unreadable: {exc}"
        found.append({"file": _relative(path, root), "reason": reason})
    return found


def files_not_images(root: Path | None, classes: set[str]) -> list[str]:
    """Files in the class folders that the loader ignores (no image suffix)."""
    if root is None:
        return []
    return sorted(
        str(path.relative_to(root))
        for name in sorted(classes)
        for path in (root / name).rglob("*")
        if path.is_file()
        and path.suffix.lower() not in IMAGE_SUFFIXES
        and not path.name.startswith(".")
    )


def scan(images: LabelledImages) -> Inventory:
    """Describe every image of ``images`` (decoding files on all cores, in threads)."""
    root = folder_of(images)
    if images.pixels is not None:
        rows = [_describe(Image.fromarray(pixels.squeeze()), "array") for pixels in images.pixels]
        keys = [f"{label}/#{index}" for index, label in enumerate(images.names.tolist())]
    else:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            rows = list(pool.map(_describe_file, images.paths.tolist(), chunksize=32))
        keys = [_relative(path, root) for path in images.paths.tolist()]
    columns = list(zip(*rows, strict=True)) if rows else [()] * 8
    return Inventory(
        keys=keys,
        labels=np.asarray(images.names),
        widths=np.asarray(columns[0], dtype=np.int64),
        heights=np.asarray(columns[1], dtype=np.int64),
        modes=list(columns[2]),
        formats=list(columns[3]),
        digests=list(columns[4]),
        thumbnails=np.asarray(columns[5], dtype=np.uint8).reshape(-1, 32, 32),
        hashes=np.asarray(columns[6], dtype=np.uint64),
        cut_thumbnails=np.asarray(columns[7], dtype=np.uint8).reshape(-1, len(CROPS), 32, 32),
        unreadable=unreadable_files(images.skipped, root),
        not_images=files_not_images(root, set(images.names.tolist())),
    )


def odd_images(inventory: Inventory) -> list[dict]:
    """Images whose size or mode is far from the rest, each with the reason."""
    if len(inventory) == 0:
        return []
    area = inventory.widths * inventory.heights
    aspect = np.maximum(inventory.widths, inventory.heights) / np.maximum(
        np.minimum(inventory.widths, inventory.heights), 1
    )
    median_area, median_aspect = float(np.median(area)), float(np.median(aspect))
    modes, counts = np.unique(np.asarray(inventory.modes), return_counts=True)
    rare = {
        mode: count
        for mode, count in zip(modes.tolist(), counts.tolist(), strict=True)
        if count < RARE_MODE_SHARE * len(inventory)
    }
    found = []
    for index, key in enumerate(inventory.keys):
        reasons = []
        if not 1 / AREA_FACTOR <= area[index] / median_area <= AREA_FACTOR:
            reasons.append(
                f"{inventory.widths[index]}x{inventory.heights[index]} pixels, the median image "
                f"has {median_area:.0f}"
            )
        if aspect[index] >= ASPECT_FACTOR * median_aspect:
            reasons.append(f"aspect ratio {aspect[index]:.1f}, the median is {median_aspect:.1f}")
        if inventory.modes[index] in rare:
            mode = inventory.modes[index]
            reasons.append(f"mode {mode}, which {rare[mode]} of {len(inventory)} images have")
        if reasons:
            found.append({"index": index, "file": key, "reason": "; ".join(reasons)})
    return found


@dataclass
class Scanned:
    """The model-free part of the audit, which the training job's split also needs."""

    inventory: Inventory
    duplicates: Duplicates
    seconds: float


def scan_images(images: LabelledImages) -> Scanned:
    """Describe every image and find its exact and near duplicates."""
    started = time.monotonic()
    inventory = scan(images)
    duplicates = find_duplicates(
        inventory.digests, inventory.thumbnails, inventory.hashes, inventory.cut_thumbnails
    )
    return Scanned(inventory, duplicates, time.monotonic() - started)
