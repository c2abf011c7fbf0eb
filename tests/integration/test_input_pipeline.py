"""The tf.data input pipeline over a folder: every image once per epoch, reshuffled, whether the
decoded images are cached in memory or streamed from disk (a folder larger than memory)."""

import numpy as np
import pytest

from service.core.preprocessing import ImageSpec
from tests.helpers import encode_image, write_class_folder
from training.data import pipelines as pipeline
from training.data.labels import encode_labels, one_hot
from training.data.pipelines import make_dataset
from training.data.sources import load_image_folder

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


@pytest.mark.parametrize(
    "cache_bytes", [pipeline.IN_MEMORY_CACHE_BYTES, 0], ids=["cached", "streamed"]
)
def test_every_image_keeps_its_own_label_through_the_shuffled_pipeline(
    tmp_path, monkeypatch, cache_bytes
):
    monkeypatch.setattr(pipeline, "IN_MEMORY_CACHE_BYTES", cache_bytes)
    # Each image is one flat grey level, unique to it; its class is the folder it is in, chosen
    # without pattern, so a pipeline that paired images and targets wrongly could not pass.
    rng = np.random.default_rng(3)
    levels = rng.permutation(np.arange(4, 250, 7))
    classes = ["a", "b", "c"]
    truth = {}
    for level in levels:
        name = classes[rng.integers(0, len(classes))]
        (tmp_path / name).mkdir(exist_ok=True)
        pixels = np.full((16, 16), level, dtype=np.uint8)
        (tmp_path / name / f"{level:03d}.png").write_bytes(encode_image(pixels, "PNG"))
        truth[int(level)] = classes.index(name)
    images = load_image_folder(tmp_path)
    labels = encode_labels(images.names, classes)
    dataset = make_dataset(
        images,
        np.arange(len(labels)),
        one_hot(labels, len(classes)),
        ImageSpec(16, 16, 1),
        batch_size=4,
        training=True,
        seed=2,
    )
    for _ in range(2):  # two epochs, each in a new order
        seen = []
        for pixels, targets in dataset:
            pixels, targets = pixels.numpy(), targets.numpy()
            for image, target in zip(pixels, targets, strict=True):
                level = int(image[0, 0, 0])
                assert (image == level).all()
                assert int(np.argmax(target)) == truth[level], f"grey level {level}"
                seen.append(level)
        assert sorted(seen) == sorted(truth)
