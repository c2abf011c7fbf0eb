"""The data audit's model-free checks on generated folders with planted faults, confident
learning on known probabilities, and the group-aware split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from benchmarks.audit_faults import COPY_KINDS, write_planted_folder
from tests.helpers import encode_image, shape_image
from training.audit.labels import find_label_issues
from training.audit.report import write_report
from training.audit.run import audit
from training.data.duplicates import keep_one_per_group
from training.data.labels import class_names_of, encode_labels
from training.data.sources import load_image_folder
from training.data.splits import split_indices

CLASSES = {"square": 0, "hbar": 1, "vbar": 2}


def audited(folder):
    images = load_image_folder(folder)
    class_names = class_names_of(images)
    return images, audit(images, class_names, encode_labels(images.names, class_names))


def shapes(per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = np.repeat(list(CLASSES), per_class)
    pixels = np.stack([shape_image(CLASSES[name], 64, False, rng) for name in names])
    return pixels, names


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    pixels, names = shapes(40)
    record = write_planted_folder(
        folder, pixels, names, flip=0.05, copies=0.1, cross_label_copies=0.34, exact_copies=3,
        outliers=2,
    )  # fmt: skip
    (folder / "square" / "notes.txt").write_text("not an image")
    wide = shape_image(0, 64, False, np.random.default_rng(99)).repeat(8, axis=1)
    (folder / "square" / "wide.png").write_bytes(encode_image(wide, "PNG"))
    images, result = audited(folder)
    return folder, record, images, result


def groups_of(result):
    return [{result.inventory.keys[i] for i in group} for group in result.duplicates.near]


def test_every_planted_copy_is_grouped_with_its_original(planted):
    _, record, _, result = planted
    groups = groups_of(result)
    copies = record["near_copies"] + record["exact_copies"]
    assert {c["kind"] for c in record["near_copies"]} == set(COPY_KINDS)
    missed = [c for c in copies if not any({c["file"], c["of"]} <= g for g in groups)]
    assert not missed, missed
    # Nothing else: each group is one planted copy with its original.
    assert len(groups) == len(copies), groups


def test_exact_copies_are_exact_and_near_ones_are_not(planted):
    _, record, _, result = planted
    exact = [{result.inventory.keys[i] for i in group} for group in result.duplicates.exact]
    assert sorted(map(sorted, exact)) == sorted(
        sorted([c["file"], c["of"]]) for c in record["exact_copies"]
    )


def test_copies_under_another_label_are_conflicts(planted):
    _, record, _, result = planted
    conflicts = [{result.inventory.keys[i] for i in group} for group in result.conflicts]
    cross = [c for c in record["near_copies"] if c["cross_label"]]
    assert cross and len(conflicts) == len(cross)
    assert all(any({c["file"], c["of"]} <= g for g in conflicts) for c in cross)
    assert result.blocking() and "different labels" in result.blocking()[0]


def test_every_corrupt_file_is_named_with_its_reason(planted):
    _, record, _, result = planted
    named = {row["file"]: row["reason"] for row in result.inventory.unreadable}
    assert set(named) == set(record["corrupt"])
    (empty,) = [name for name in named if name.endswith("corrupt-empty.png")]
    assert named[empty].startswith("empty_file") and "truncated" in str(named)
    assert result.inventory.not_images == ["square/notes.txt"]


def test_an_image_of_odd_shape_is_reported(planted):
    _, _, _, result = planted
    odd = {row["file"]: row["reason"] for row in result.odd}
    assert list(odd) == ["square/wide.png"] and "aspect ratio 8.0" in odd["square/wide.png"]


def test_report_files_are_written(planted, tmp_path):
    _, _, images, result = planted
    report = write_report(result, images, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "report.json", "report.md", "relabel.csv", "duplicates.png",
    }  # fmt: skip
    assert report["label_issues"] is None and len(report["label_conflicts"]) >= 1
    text = (tmp_path / "report.md").read_text()
    assert "## Duplicates under different labels" in text and "corrupt-empty.png" in text


def test_a_clean_folder_has_no_duplicates(tmp_path):
    """Distinct pictures (smooth random fields, grey and colour, of mixed sizes and formats)."""
    rng = np.random.default_rng(5)
    for number in range(60):
        side = int(rng.choice([32, 48, 80]))
        field = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        field = field.filter(ImageFilter.GaussianBlur(side / 12)).convert(
            "L" if number % 2 else "RGB"
        )
        folder = tmp_path / list(CLASSES)[number % 3]
        folder.mkdir(exist_ok=True)
        field.save(folder / f"{number}.{('png', 'jpg', 'webp')[number % 3]}")
    _, result = audited(tmp_path)
    assert result.duplicates.near == [] and result.duplicates.exact == []
    assert result.conflicts == [] and result.blocking() == []


def test_drop_duplicates_keeps_the_majority_label():
    groups = [np.array([0, 1, 2]), np.array([3, 4])]
    labels = np.array([1, 0, 0, 2, 2])
    assert keep_one_per_group(groups, labels).tolist() == [0, 2, 4]


def test_confident_learning_finds_flipped_labels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 2000)
    probabilities = rng.dirichlet(np.ones(4) * 0.3, 2000) * 0.3
    probabilities[np.arange(2000), truth] += 0.7
    given = truth.copy()
    flipped = rng.choice(2000, 60, replace=False)
    given[flipped] = (truth[flipped] + 1) % 4
    issues = find_label_issues(probabilities, given)
    # Nearly all found, the most likely ones all flipped, each with its true label suggested.
    assert len(set(issues.ranked.tolist()) & set(flipped.tolist())) >= 48
    assert set(issues.ranked[:40].tolist()) <= set(flipped.tolist())
    order = {int(i): r for r, i in enumerate(issues.ranked)}
    assert all(issues.suggested[order[i]] == truth[i] for i in flipped if i in order)
    assert abs(issues.estimated_errors - 60) <= 10 and len(issues.ranked) == issues.estimated_errors
    assert issues.self_confidence.tolist() == sorted(issues.self_confidence.tolist())
    assert issues.top(0.01, 2000).tolist() == issues.ranked[:20].tolist()


def test_a_duplicate_group_never_spans_two_splits():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    groups = np.arange(600)
    for _ in range(80):  # groups of 2 to 5 copies, some under different labels
        members = rng.choice(600, int(rng.integers(2, 6)), replace=False)
        groups[members] = groups[members].min()
    splits = split_indices(labels, 0.1, 0.2, seed=3, groups=groups)
    split_of = np.empty(600, dtype=int)
    for number, part in enumerate((splits.train, splits.validation, splits.test)):
        split_of[part] = number
    assert sorted(np.concatenate([splits.train, splits.validation, splits.test])) == list(
        range(600)
    )
    for group in np.unique(groups):
        assert len(np.unique(split_of[groups == group])) == 1
    assert 0.15 < len(splits.test) / 600 < 0.25


def test_without_shared_groups_the_split_is_the_plain_one():
    labels = np.random.default_rng(2).integers(0, 4, 500)
    plain = split_indices(labels, 0.1, 0.2, seed=7)
    grouped = split_indices(labels, 0.1, 0.2, seed=7, groups=np.arange(500))
    for a, b in zip(
        (plain.train, plain.validation, plain.test),
        (grouped.train, grouped.validation, grouped.test),
        strict=True,
    ):
        assert a.tolist() == b.tolist()


def test_in_memory_images_are_audited_by_index():
    from training.data.sources import LabelledImages

    pixels, names = shapes(10)
    pixels = np.concatenate([pixels, pixels[:1]])
    names = np.concatenate([names, ["hbar"]])
    images = LabelledImages(names, tuple(CLASSES), "memory", "x", 1, 64, pixels=pixels)
    result = audit(images, sorted(CLASSES), encode_labels(names, sorted(CLASSES)))
    assert [result.inventory.keys[i] for i in result.conflicts[0]] == ["square/#0", "hbar/#30"]
    assert Image.fromarray(pixels[0]).size == (64, 64)


def test_prepared_data_keeps_copies_in_one_split_and_drops_them_on_request(planted):
    from training.config import TrainConfig
    from training.data.prepare import prepare_data

    folder, record, _, _ = planted
    config = TrainConfig(data=str(folder), test_split=0.3, drop_duplicates=True)
    data = prepare_data(config)
    keys = data.scanned.inventory.keys
    split_of = {}
    for name in ("train", "validation", "test"):
        split_of |= {keys[i]: name for i in getattr(data.splits, name)}
    copies = record["near_copies"] + record["exact_copies"]
    # One image of each pair is dropped; the one kept is of the pair's most common label.
    assert len(data.dropped) == len(copies)
    kept = [c for c in copies if (c["file"] in split_of) != (c["of"] in split_of)]
    assert len(kept) == len(copies)
    undropped = prepare_data(TrainConfig(data=str(folder), test_split=0.3))
    assert len(undropped.dropped) == 0
    keys = undropped.scanned.inventory.keys
    for name in ("train", "validation", "test"):
        split_of |= {keys[i]: name for i in getattr(undropped.splits, name)}
    assert all(split_of[c["file"]] == split_of[c["of"]] for c in copies)
    # The test split is the same with and without --drop-duplicates, less the dropped copies.
    assert set(data.splits.test) == set(undropped.splits.test) - set(data.dropped.tolist())


def test_excluded_suspects_come_from_training_and_validation_only():
    import dataclasses

    from training.audit.job import exclude_suspects
    from training.audit.labels import LabelIssues
    from training.data.prepare import PreparedData
    from training.data.splits import Splits

    splits = Splits(np.arange(0, 70), np.arange(70, 80), np.arange(80, 100))
    data = PreparedData(None, ["a", "b"], None, np.zeros(100, int), None, splits)
    ranked = np.array([85, 3, 72, 90, 10, 11, 12, 13, 14])
    issues = LabelIssues(ranked, *([np.zeros(9)] * 4), 9, np.ones(2), np.zeros((2, 2)))
    result = type("Result", (), {"issues": issues, "excluded": None, "labels_judged": True})()
    trimmed = exclude_suspects(data, result, fraction=0.05)  # 5% of 80 images: 4
    assert result.excluded.tolist() == [3, 10, 11, 72]
    assert trimmed.splits.test.tolist() == splits.test.tolist()
    assert set(trimmed.splits.train) | set(trimmed.splits.validation) == set(range(80)) - {
        3,
        10,
        11,
        72,
    }
    assert dataclasses.replace(data) is not trimmed
