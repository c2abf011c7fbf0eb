"""Loading labelled images: the built-in set (checked by sha256) and folders of class folders."""

import logging

import numpy as np
import pytest

from tests.helpers import write_class_folder
from training.data.sources import (
    ANIMAL_CLASSES,
    DataError,
    _load_verified_pickle,
    load_animals,
    load_image_folder,
    load_source,
)


def test_built_in_animals_load_after_their_checksums_match():
    images = load_animals()
    assert images.pixels.shape == (10_000, 28, 28)
    assert images.pixels.dtype == np.uint8
    assert sorted(set(images.names.tolist())) == sorted(ANIMAL_CLASSES)
    assert (np.unique(images.names, return_counts=True)[1] == 1000).all()


def test_a_file_with_the_wrong_checksum_is_never_unpickled(tmp_path):
    tampered = tmp_path / "animal_data_version_3.gz"
    tampered.write_bytes(b"anything")
    with pytest.raises(DataError, match="refusing to unpickle"):
        _load_verified_pickle(tampered, "0" * 64)


def test_folder_of_mixed_formats_sizes_and_modes_loads(tmp_path):
    write_class_folder(tmp_path, {"square": 0, "bar": 1}, per_class=10)
    images = load_image_folder(tmp_path)
    assert len(images) == 20
    assert images.channels == 3  # some images are colour
    assert images.native_size is None  # sizes differ
    assert sorted(images.class_order) == ["bar", "square"]
    suffixes = {path.rsplit(".", 1)[1] for path in images.paths.tolist()}
    assert suffixes == {"png", "jpg", "bmp", "gif", "webp"}


def test_unreadable_files_are_skipped_named_and_counted(tmp_path, caplog):
    write_class_folder(tmp_path, {"square": 0, "bar": 1}, per_class=4)
    (tmp_path / "bar" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "bar" / "empty.jpg").write_bytes(b"")
    (tmp_path / "bar" / "notes.txt").write_text("not an image, and not an image suffix")
    with caplog.at_level(logging.WARNING):
        images = load_image_folder(tmp_path)
    assert len(images) == 8
    assert sorted(path.rsplit("/", 1)[1] for path in images.skipped) == ["broken.png", "empty.jpg"]
    assert "broken.png" in caplog.text and "skipped 2 unreadable" in caplog.text


def test_empty_class_folder_stops_with_a_clear_error(tmp_path):
    write_class_folder(tmp_path, {"square": 0, "bar": 1}, per_class=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class.*no readable images"):
        load_image_folder(tmp_path)


def test_fewer_than_two_classes_or_no_folder_stops(tmp_path):
    write_class_folder(tmp_path, {"square": 0}, per_class=3)
    with pytest.raises(DataError, match="at least two"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_source(str(tmp_path / "missing"))


def test_class_label_file_sets_the_integer_order_and_must_match(tmp_path):
    write_class_folder(tmp_path, {"square": 0, "bar": 1}, per_class=3)
    (tmp_path / "labels.txt").write_text("square\nbar\n")
    assert load_image_folder(tmp_path).class_order == ("square", "bar")
    (tmp_path / "labels.txt").write_text("square\ncircle\n")
    with pytest.raises(DataError, match="labels.txt"):
        load_image_folder(tmp_path)


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    write_class_folder(tmp_path, {"square": 0, "bar": 1}, per_class=3)
    before = load_image_folder(tmp_path).fingerprint
    assert load_image_folder(tmp_path).fingerprint == before
    first = sorted((tmp_path / "bar").iterdir())[0]
    first.write_bytes(
        (
            tmp_path / "square" / sorted(p.name for p in (tmp_path / "square").iterdir())[0]
        ).read_bytes()
    )
    assert load_image_folder(tmp_path).fingerprint != before


def test_unknown_keras_dataset_is_refused_without_a_download():
    with pytest.raises(DataError, match="keras:mnist"):
        load_source("keras:imagenet")
