"""Where labelled images come from: the built-in Animal silhouettes set, a folder of class
folders, or a ``keras.datasets`` set. Each source yields the same :class:`LabelledImages`."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.core.preprocessing import (
    IMAGE_SUFFIXES,
    PIXEL_LIMIT_BYTES,
    ImageError,
    ImageSpec,
    decode_image,
    preprocess_bytes,
)

log = logging.getLogger(__name__)

# The Animal silhouettes files of the pinned animal-mnist 0.4 package, checked before unpickling:
# unpickling runs code, so only the exact bytes this project reviewed are ever loaded.
ANIMALS_PACKAGE_VERSION = "0.4"
ANIMALS_FILES = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
# The dataset's class-label file: integer label i in the package means ANIMAL_CLASSES[i].
ANIMAL_CLASSES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip
KERAS_DATASETS = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": (
        "tshirt_top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle_boot",
    ),  # fmt: skip
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),  # fmt: skip
}
# An optional class-label file in a data folder: one class name per line, line i is label i.
CLASS_LABEL_FILE = "labels.txt"


class DataError(Exception):
    """The data cannot be used; the message names the file or folder and the fix."""


@dataclass
class LabelledImages:
    """Images with one class name each, either held in memory or as files read on demand.

    Exactly one of ``pixels`` (``(N, H, W)`` or ``(N, H, W, C)`` uint8) and ``paths`` is set.
    """

    names: np.ndarray  # (N,) str: the class name of each image
    class_order: tuple[str, ...]  # the integer order of the classes
    source: str
    fingerprint: str  # sha256 over the source's bytes: same data, same fingerprint
    channels: int
    native_size: int | None  # side of the images when they all share one square size
    pixels: np.ndarray | None = None
    paths: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    # (N,) int: which of several --data sources each image came from (0: the first); None for
    # one source.
    origins: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def origin(self) -> np.ndarray:
        """(N,) int: the source of each image (all 0 for one source)."""
        if self.origins is None:
            return np.zeros(len(self), dtype=np.int64)
        return self.origins

    def subset(self, indices: np.ndarray, names: np.ndarray | None = None) -> LabelledImages:
        """The images at ``indices``, optionally renamed (used to fold classes together)."""
        return LabelledImages(
            names=self.names[indices] if names is None else names,
            class_order=self.class_order,
            source=self.source,
            fingerprint=self.fingerprint,
            channels=self.channels,
            native_size=self.native_size,
            pixels=None if self.pixels is None else self.pixels[indices],
            paths=None if self.paths is None else self.paths[indices],
            skipped=self.skipped,
            origins=None if self.origins is None else self.origins[indices],
        )


def load_sources(data: str) -> LabelledImages:
    """Load ``--data``: one source, or several, comma-separated, trained on together (the
    original data, then folders such as the captured inputs of ``python -m training captured``).
    """
    names = [part.strip() for part in data.split(",") if part.strip()]
    sources = [load_source(name) for name in names]
    return sources[0] if len(sources) == 1 else merge_sources(sources)


def merge_sources(sources: list[LabelledImages]) -> LabelledImages:
    """One set of several sources, each image tagged with its source (``origins``). Folders
    join an in-memory first source as pixels at its size and channels (decoded here, by the
    shared preprocessing); after a folder, only folders may follow."""
    first = sources[0]
    if first.pixels is None and any(source.pixels is not None for source in sources[1:]):
        raise DataError("--data: an in-memory set (animals, keras:...) must come first")
    class_order = list(first.class_order)
    class_order += sorted({n for s in sources[1:] for n in s.class_order} - set(class_order))
    origins = np.concatenate(
        [np.full(len(source), position) for position, source in enumerate(sources)]
    )
    merged = {
        "names": np.concatenate([source.names for source in sources]),
        "class_order": tuple(class_order),
        "source": "+".join(source.source for source in sources),
        "fingerprint": hashlib.sha256(
            "".join(source.fingerprint for source in sources).encode()
        ).hexdigest(),
        "channels": max(source.channels for source in sources),
        "skipped": [path for source in sources for path in source.skipped],
        "origins": origins,
    }
    if first.pixels is None:
        sizes = {source.native_size for source in sources}
        return LabelledImages(
            **merged,
            native_size=sizes.pop() if len(sizes) == 1 else None,
            paths=np.concatenate([source.paths for source in sources]),
        )
    spec = ImageSpec(first.native_size, first.native_size, first.channels)
    pixels = [first.pixels.reshape(len(first), *spec.shape)]
    for source in sources[1:]:
        pixels.append(_folder_pixels(source, spec))
    return LabelledImages(
        **{**merged, "channels": first.channels},
        native_size=first.native_size,
        pixels=np.concatenate(pixels),
    )


def _folder_pixels(source: LabelledImages, spec: ImageSpec) -> np.ndarray:
    if source.paths is None:
        raise DataError(f"--data: {source.source} can only come first")
    limit = PIXEL_LIMIT_BYTES
    return np.stack(
        [preprocess_bytes(Path(p).read_bytes(), spec, max_bytes=limit) for p in source.paths]
    )


def load_source(data: str) -> LabelledImages:
    """Load one source: ``animals``, ``keras:<name>`` or a folder path."""
    if data == "animals":
        return load_animals()
    if data.startswith("keras:"):
        return load_keras_dataset(data.removeprefix("keras:"))
    return load_image_folder(Path(data))


def _animals_data_dir() -> Path:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the built-in dataset needs the package animal-mnist=={ANIMALS_PACKAGE_VERSION}: "
            "run 'make install'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def _load_verified_pickle(path: Path, expected_sha256: str):
    if not path.is_file():
        raise DataError(f"{path} is missing: reinstall animal-mnist=={ANIMALS_PACKAGE_VERSION}")
    content = path.read_bytes()
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise DataError(
            f"{path} has sha256 {actual}, expected {expected_sha256}: refusing to unpickle it; "
            f"reinstall animal-mnist=={ANIMALS_PACKAGE_VERSION}"
        )
    return pickle.loads(gzip.decompress(content))


def load_animals() -> LabelledImages:
    """The built-in Animal silhouettes: 10,000 greyscale 28x28 images, 1,000 per class."""
    folder = _animals_data_dir()
    pixels = _load_verified_pickle(
        folder / "animal_data_version_3.gz", ANIMALS_FILES["animal_data_version_3.gz"]
    )
    labels = _load_verified_pickle(
        folder / "animal_label_version_3.gz", ANIMALS_FILES["animal_label_version_3.gz"]
    )
    pixels = np.asarray(pixels, dtype=np.uint8)
    fingerprint = hashlib.sha256("".join(sorted(ANIMALS_FILES.values())).encode()).hexdigest()
    names = np.asarray(ANIMAL_CLASSES)[np.asarray(labels, dtype=np.int64)]
    return LabelledImages(
        names=names,
        class_order=tuple(sorted(ANIMAL_CLASSES)),
        source=f"animal-mnist=={ANIMALS_PACKAGE_VERSION}",
        fingerprint=fingerprint,
        channels=1,
        native_size=pixels.shape[1],
        pixels=pixels,
    )


def load_keras_dataset(name: str) -> LabelledImages:
    """A ``keras.datasets`` set, train and test parts together (this job makes its own splits).

    Needs the internet the first time: Keras downloads the arrays into ``~/.keras/datasets``.
    """
    if name not in KERAS_DATASETS:
        raise DataError(
            f"unknown Keras dataset {name!r}: use one of "
            + ", ".join(f"keras:{known}" for known in KERAS_DATASETS)
        )
    import keras

    loader = getattr(keras.datasets, name)
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise DataError(
            f"keras.datasets.{name} could not be loaded ({exc}); it downloads on first use, so "
            "this needs the internet, or use --data animals or a folder of images"
        ) from exc
    pixels = np.concatenate([x_train, x_test]).astype(np.uint8)
    labels = np.concatenate([y_train, y_test]).reshape(-1).astype(np.int64)
    class_names = KERAS_DATASETS[name]
    return LabelledImages(
        names=np.asarray(class_names)[labels],
        class_order=tuple(sorted(class_names)),
        source=f"keras.datasets.{name}",
        fingerprint=hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest(),
        channels=1 if pixels.ndim == 3 else pixels.shape[-1],
        native_size=pixels.shape[1] if pixels.shape[1] == pixels.shape[2] else None,
        pixels=pixels,
    )


def _read_class_label_file(folder: Path, class_dirs: list[str]) -> tuple[str, ...]:
    label_file = folder / CLASS_LABEL_FILE
    if not label_file.is_file():
        return tuple(sorted(class_dirs))
    listed = [line.strip() for line in label_file.read_text().splitlines() if line.strip()]
    if len(set(listed)) != len(listed) or sorted(listed) != sorted(class_dirs):
        raise DataError(
            f"{label_file} lists {listed} but the class folders are {sorted(class_dirs)}: make "
            "it name each class folder once, one per line, or delete it to use sorted names"
        )
    return tuple(listed)


def _class_folders(folder: Path) -> list[str]:
    """The class folders of ``folder``, sorted; at least two, or a line saying what is wrong."""
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder: --data takes 'animals', keras:<name> or a folder with "
            "one sub-folder of images per class"
        )
    class_dirs = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if len(class_dirs) < 2:
        raise DataError(
            f"{folder} has {len(class_dirs)} class folder(s); a classifier needs at least two "
            "sub-folders, one per class, each holding that class's images"
        )
    return class_dirs


def load_image_folder(folder: Path) -> LabelledImages:
    """A folder with one sub-folder per class, each holding PNG/JPEG/BMP/GIF/WEBP images.

    Every file is read and decoded once here so that unreadable ones are skipped (with a warning
    naming them) before the splits are drawn; the pixels are decoded again, lazily, by the input
    pipeline, so a folder larger than memory still trains.
    """
    class_dirs = _class_folders(folder)
    class_order = _read_class_label_file(folder, class_dirs)
    paths, names, skipped = [], [], []
    digest = hashlib.sha256()
    any_colour = False
    sizes = set()
    for class_name in class_dirs:
        files = sorted(
            path
            for path in (folder / class_name).rglob("*")
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        )
        kept = 0
        for path in files:
            content = path.read_bytes()
            try:
                image = decode_image(content, max_bytes=PIXEL_LIMIT_BYTES)
            except ImageError as exc:
                log.warning("skipping unreadable image %s: %s", path, exc.detail)
                skipped.append(str(path))
                continue
            any_colour = any_colour or image.mode not in ("1", "L", "LA", "I", "I;16", "F")
            sizes.add(image.size)
            digest.update(f"{path.relative_to(folder)}\0".encode())
            digest.update(hashlib.sha256(content).digest())
            paths.append(str(path))
            names.append(class_name)
            kept += 1
        if kept == 0:
            raise DataError(
                f"class folder {folder / class_name} has no readable images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove the folder"
            )
    if skipped:
        log.warning("skipped %d unreadable image file(s) in %s", len(skipped), folder)
    (only_size,) = sizes if len(sizes) == 1 else (None,)
    native = only_size[0] if only_size and only_size[0] == only_size[1] else None
    return LabelledImages(
        names=np.asarray(names),
        class_order=class_order,
        source=f"folder:{folder}",
        fingerprint=digest.hexdigest(),
        channels=3 if any_colour else 1,
        native_size=native,
        paths=np.asarray(paths),
        skipped=skipped,
    )
