"""Faults planted into a folder of labelled images, with a record of each, so that the data audit
can be scored against what was planted (the tests and ``python -m benchmarks.audit`` use it)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

COPY_KINDS = ("resized and re-encoded", "slightly cropped", "brightness-shifted")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def near_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """A near duplicate of ``image``: resized (x0.7 to x2) and saved as JPEG, or cropped by
    about 2% of each side, or 15% brighter or darker; every kind re-encoded as JPEG."""
    width, height = image.size
    if kind == "slightly cropped":
        dx, dy = max(1, round(width * 0.02)), max(1, round(height * 0.02))
        image = image.crop((dx, dy, width - dx, height - dy)).resize((width, height))
    elif kind == "brightness-shifted":
        image = ImageEnhance.Brightness(image).enhance(float(rng.choice([0.85, 1.15])))
    scale = float(rng.uniform(0.7, 2.0))
    image = image.resize((max(8, round(width * scale)), max(8, round(height * scale))))
    return encode(image.convert("RGB"), "JPEG", quality=int(rng.integers(70, 95)))


def corrupt_files(rng: np.random.Generator, sample: bytes) -> dict[str, bytes]:
    """File name suffix -> content of files that do not decode."""
    jpeg = encode(Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)), "JPEG")
    return {
        "truncated.png": sample[: len(sample) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "random-bytes.png": rng.integers(0, 256, 600, dtype=np.uint8).tobytes(),
        "text.jpg": b"this is not an image\n",
    }


def photo_crops(count: int, side: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Greyscale crops of scikit-learn's sample photos: images that look like no class."""
    photos = load_sample_images().images
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        size = int(rng.integers(64, 256))
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crop = Image.fromarray(photo[top : top + size, left : left + size]).convert("L")
        crops.append(np.asarray(crop.resize((side, side))))
    return crops


def write_planted_folder(
    folder: Path,
    pixels: np.ndarray,
    names: np.ndarray,
    seed: int = 0,
    flip: float = 0.02,
    copies: float = 0.01,
    cross_label_copies: float = 0.2,
    exact_copies: int = 20,
    outliers: int = 10,
) -> dict:
    """Write ``pixels`` (``(N, H, W)`` uint8) as PNGs in class folders of ``folder``, with faults.

    Planted: ``flip`` of the images filed under another class; near copies of ``copies`` of
    them (the kinds of :data:`COPY_KINDS` in turn), ``cross_label_copies`` of those filed under
    another class; ``exact_copies`` byte-identical copies; ``outliers`` photo crops; and the
    files of :func:`corrupt_files`. Returns the record: file names relative to ``folder``.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(set(names.tolist()))
    count = len(names)
    labels = names.copy()
    flipped = rng.choice(count, int(round(flip * count)), replace=False)
    for index in flipped:
        labels[index] = rng.choice([name for name in classes if name != names[index]])
    files = [f"{labels[i]}/{i:05d}.png" for i in range(count)]
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, relative in enumerate(files):
        (folder / relative).write_bytes(encode(Image.fromarray(pixels[index]), "PNG"))
    record = {"files": count, "flipped": [files[i] for i in flipped], "near_copies": [],
              "exact_copies": [], "outliers": [], "corrupt": []}  # fmt: skip
    sources = rng.choice(np.setdiff1d(np.arange(count), flipped), int(round(copies * count)),
                         replace=False)  # fmt: skip
    for number, index in enumerate(sources):
        cross = number < round(cross_label_copies * len(sources))
        label = rng.choice([n for n in classes if n != names[index]]) if cross else names[index]
        kind = COPY_KINDS[number % len(COPY_KINDS)]
        relative = f"{label}/copy-{index:05d}.jpg"
        (folder / relative).write_bytes(near_copy(Image.fromarray(pixels[index]), kind, rng))
        record["near_copies"].append({"file": relative, "of": files[index], "kind": kind,
                                      "cross_label": bool(cross)})  # fmt: skip
    others = np.setdiff1d(np.arange(count), np.concatenate([flipped, sources]))
    for index in rng.choice(others, exact_copies, replace=False):
        relative = f"{names[index]}/exact-{index:05d}.png"
        (folder / relative).write_bytes((folder / files[index]).read_bytes())
        record["exact_copies"].append({"file": relative, "of": files[index]})
    side = pixels.shape[1]
    for number, crop in enumerate(photo_crops(outliers, side, rng)):
        relative = f"{classes[number % len(classes)]}/photo-{number:02d}.png"
        (folder / relative).write_bytes(encode(Image.fromarray(crop), "PNG"))
        record["outliers"].append(relative)
    sample = (folder / files[0]).read_bytes()
    for number, (suffix, content) in enumerate(corrupt_files(rng, sample).items()):
        relative = f"{classes[number % len(classes)]}/corrupt-{suffix}"
        (folder / relative).write_bytes(content)
        record["corrupt"].append(relative)
    return record
