"""Integer and one-hot encoding, class selection and folding, class weights, splits."""

import numpy as np
import pytest

from training.data.labels import class_names_of, encode_labels, one_hot, select_classes
from training.data.pipelines import iterations_per_epoch
from training.data.sources import DataError, LabelledImages
from training.data.splits import balanced_class_weights, split_indices


def make_images(counts: dict[str, int], order=None) -> LabelledImages:
    names = np.concatenate([np.full(count, name) for name, count in counts.items()])
    return LabelledImages(
        names=names,
        class_order=tuple(order or sorted(counts)),
        source="test",
        fingerprint="0",
        channels=1,
        native_size=4,
        pixels=np.arange(len(names) * 16, dtype=np.uint32).reshape(-1, 4, 4).astype(np.uint8),
    )


def test_integer_then_one_hot_encoding():
    class_names = ["cat", "dog", "other"]
    labels = encode_labels(np.array(["dog", "cat", "other", "dog"]), class_names)
    assert labels.tolist() == [1, 0, 2, 1]
    encoded = one_hot(labels, 3)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])


def test_class_names_are_sorted_unless_the_source_has_a_class_label_file():
    assert class_names_of(make_images({"zebra": 2, "bear": 2})) == ["bear", "zebra"]
    ordered = make_images({"zebra": 2, "bear": 2}, order=["zebra", "bear"])
    assert class_names_of(ordered) == ["zebra", "bear"]


def test_classes_keeps_only_the_listed_ones():
    images = select_classes(make_images({"cat": 3, "dog": 4, "cow": 5}), classes=("cat", "dog"))
    assert sorted(set(images.names.tolist())) == ["cat", "dog"]
    assert len(images) == 7 and len(images.pixels) == 7


def test_other_folds_every_unlisted_class_and_balances_its_weight():
    images = select_classes(
        make_images({"cat": 10, "dog": 10, "cow": 10, "pig": 10, "hen": 10}),
        classes=("cat", "dog"),
        other="other",
    )
    class_names = class_names_of(images)
    assert class_names == ["cat", "dog", "other"]
    labels = encode_labels(images.names, class_names)
    assert np.bincount(labels).tolist() == [10, 10, 30]
    weights = balanced_class_weights(labels, 3)
    # "Balanced": every class contributes the same total weight to the loss.
    totals = [weights[index] * count for index, count in enumerate(np.bincount(labels))]
    np.testing.assert_allclose(totals, [len(labels) / 3] * 3)
    assert weights[2] < weights[0]


def test_max_per_class_caps_each_class_reproducibly():
    source = make_images({"cat": 50, "dog": 20})
    first = select_classes(source, max_per_class=15, seed=3)
    again = select_classes(source, max_per_class=15, seed=3)
    assert np.bincount(encode_labels(first.names, ["cat", "dog"])).tolist() == [15, 15]
    np.testing.assert_array_equal(first.pixels, again.pixels)


def test_unknown_class_and_a_single_class_are_refused():
    with pytest.raises(DataError, match="horse"):
        select_classes(make_images({"cat": 3, "dog": 3}), classes=("cat", "horse"))
    with pytest.raises(DataError, match="two classes"):
        select_classes(make_images({"cat": 3, "dog": 3}), classes=("cat",))


def test_splits_are_disjoint_stratified_and_deterministic():
    labels = np.repeat([0, 1, 2], [100, 50, 150])
    first = split_indices(labels, validation_split=0.1, test_split=0.2, seed=7)
    again = split_indices(labels, validation_split=0.1, test_split=0.2, seed=7)
    other_seed = split_indices(labels, validation_split=0.1, test_split=0.2, seed=8)
    for part in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(first, part), getattr(again, part))
    assert not np.array_equal(first.test, other_seed.test)
    together = np.concatenate([first.train, first.validation, first.test])
    assert sorted(together.tolist()) == list(range(300))
    assert len(first.test) == 60 and len(first.validation) == 30
    # Each class keeps its share in the test split.
    assert np.bincount(labels[first.test]).tolist() == [20, 10, 30]


def test_too_few_images_to_stratify_is_a_clear_error():
    with pytest.raises(DataError, match="smallest class"):
        split_indices(np.array([0, 0, 0, 1]), validation_split=0.1, test_split=0.2, seed=0)


@pytest.mark.parametrize(("images", "batch", "steps"), [(7000, 32, 219), (64, 32, 2), (1, 32, 1)])
def test_iterations_per_epoch_is_ceil_of_images_over_batch(images, batch, steps):
    assert iterations_per_epoch(images, batch) == steps
