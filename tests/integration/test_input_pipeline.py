"""The tf.data input pipeline over a folder: every image once per epoch, reshuffled, whether the
decoded images are cached in memory or streamed from disk (a folder larger than memory)."""

import numpy as np
import pytest

from service.preprocessing import ImageSpec
from tests.conftest import write_class_folder
from training import data as pipeline
from training.data import encode_labels, make_dataset, one_hot
from training.sources import load_image_folder

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    "cache_bytes", [pipeline.IN_MEMORY_CACHE_BYTES, 0], ids=["cached", "streamed"]
)
def test_each_epoch_yields_every_image_once_in_a_new_order(tmp_path, monkeypatch, cache_bytes):
    monkeypatch.setattr(pipeline, "IN_MEMORY_CACHE_BYTES", cache_bytes)
    images = load_image_folder(write_class_folder(tmp_path, {"a": 0, "b": 1}, per_class=12))
    spec = ImageSpec(16, 16, 3)
    labels = encode_labels(images.names, ["a", "b"])
    indices = np.arange(len(labels))
    dataset = make_dataset(
        images, indices, one_hot(labels, 2), spec, batch_size=5, training=True, seed=1
    )
    epochs = []
    for _ in range(2):
        pixels = np.concatenate([batch.numpy() for batch, _ in dataset])
        assert pixels.shape == (24, 16, 16, 3) and pixels.dtype == np.float32
        epochs.append(pixels.reshape(24, -1))
    first, second = epochs
    assert sorted(map(bytes, first.astype(np.uint8))) == sorted(map(bytes, second.astype(np.uint8)))
    assert not np.array_equal(first, second)  # reshuffled every epoch
