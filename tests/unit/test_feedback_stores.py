"""The capture store behind the production loop, on real files: policy, bound, eviction, no
half-written entry even under SIGKILL, and its export to training data. The prediction log has
its own tests, on real databases (tests/integration/test_prediction_log.py)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import signal
import time

import numpy as np
import pytest

from service.http.capture import CapturePolicy, CaptureStore, Entry, entry_size, write_label
from training.command_config import CapturedConfig
from training.data.captured import export_captured, read_store
from training.data.sources import DataError


def test_the_policy_keeps_unknown_then_hard_then_a_sample():
    unknown = np.array([True, False, False, False])
    margins = np.array([0.5, 0.01, 0.5, 0.5], dtype=np.float32)
    assert CapturePolicy.from_setting("unknown", 0.1).reasons(unknown, margins) == [
        "unknown",
        None,
        None,
        None,
    ]
    assert CapturePolicy.from_setting("hard", 0.1).reasons(unknown, margins) == [
        "unknown",
        "low_margin",
        None,
        None,
    ]
    assert CapturePolicy.from_setting("sample:1", 0.1).reasons(unknown, margins) == [
        "unknown",
        "low_margin",
        "sample",
        "sample",
    ]


class Counts:
    def __init__(self):
        self.written, self.evicted, self.dropped = [], [], 0

    def store(self, folder, max_bytes):
        return CaptureStore(
            folder,
            max_bytes,
            on_written=self.written.append,
            on_evicted=self.evicted.append,
            on_dropped=lambda: setattr(self, "dropped", self.dropped + 1),
        )


def answer(label: str = "cat", unknown: bool = False, margin: float = 0.5) -> dict:
    top = [{"label": label, "score": 0.6}, {"label": "dog", "score": 0.6 - margin}]
    return {
        "label": "unknown" if unknown else label,
        "score": 0.6,
        "top_k": top,
        "unknown": unknown,
        "ood_score": 20.0 if unknown else 2.0,
        "ood_threshold": 10.0,
        "margin": margin,
    }


def test_entries_are_written_whole_and_the_oldest_evicted_past_the_bound(tmp_path):
    data = b"\x89PNG" + bytes(996)
    probe = Counts().store(tmp_path / "probe", max_bytes=10**9)
    probe.submit(Entry("id0", answer(), data=data), "sample")
    probe.flush()
    (name,) = probe.entries()
    on_disk = entry_size(name)  # what one entry takes: its folder, input and answer
    folder = tmp_path / "probe" / name
    assert on_disk == sum(p.stat().st_blocks * 512 for p in (folder, *folder.iterdir())) > 1000
    counts = Counts()
    store = counts.store(tmp_path / "store", max_bytes=3 * on_disk)
    for index in range(10):
        store.submit(Entry(f"id{index}", answer(), data=data), "sample")
    store.flush()
    names = store.entries()
    assert len(names) == 3 and [name.rsplit("-", 1)[1] for name in names] == ["id7", "id8", "id9"]
    assert counts.written == ["sample"] * 10 and counts.evicted == [on_disk] * 7
    for name in names:
        assert (tmp_path / "store" / name / "input.png").stat().st_size == 1000
        assert json.loads((tmp_path / "store" / name / "answer.json").read_text())["request_id"]


def _write_forever(folder: str) -> None:
    store = CaptureStore(folder, 10**9, print, print, print)
    index = 0
    while True:
        store.submit(Entry(f"e{index}", answer(), data=os.urandom(50_000)), "sample")
        index += 1
        time.sleep(0.0005)


def test_a_writer_killed_mid_write_leaves_no_half_written_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    rng = np.random.default_rng()
    for _ in range(5):
        before = len(list(tmp_path.iterdir()))
        process = context.Process(target=_write_forever, args=(str(tmp_path),), daemon=True)
        process.start()
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) <= before + 1:  # writing (a loaded machine starts late)
            assert time.monotonic() < deadline, "the writer wrote nothing in 60 s"
            time.sleep(0.01)
        time.sleep(rng.random() / 2)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert visible, "nothing was written"
    for folder in visible:
        assert (folder / "answer.json").is_file()
        # Random bytes may begin like a JPEG or BMP signature, and are then kept as such.
        (written,) = folder.glob("input.*")
        assert written.stat().st_size == 50_000
    # What the kills left behind is swept by the next writer (once old enough) and never read.
    assert len(read_store(tmp_path).entries) == len(visible)


def test_a_new_writer_sweeps_what_dead_writers_left_and_nothing_else(tmp_path):
    old = time.time() - 120
    left = {
        ".partial-1-3-old": old,  # its writer died mid-write
        ".partial-2-3-young": None,  # another worker is writing this one now
        ".evicting-3-3-claimed": None,  # claimed by an evictor that died
        "4-3-done": old,  # a complete entry, however old
    }
    for name, mtime in left.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "input.png").write_bytes(b"abc")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / "4-3-done" / "answer.json").write_text(json.dumps({**answer(), "request_id": "d"}))
    store = Counts().store(tmp_path, max_bytes=10**9)
    store.submit(Entry("new", answer(), data=b"\x89PNG"), "sample")
    store.flush()
    remaining = sorted(path.name for path in tmp_path.iterdir() if "new" not in path.name)
    assert remaining == [".partial-2-3-young", "4-3-done"]
    assert sorted(entry.request_id for entry in read_store(tmp_path).entries) == ["d", "new"]


def test_the_export_writes_class_folders_a_ranked_queue_and_each_input_once(tmp_path):
    store = Counts().store(tmp_path / "store", max_bytes=10**9)
    image = lambda seed: bytes([137, 80, 78, 71]) + bytes([seed]) * 100  # noqa: E731
    store.submit(Entry("a", answer(), data=image(1)), "sample")
    store.submit(Entry("a-copy", answer(), data=image(1)), "sample")  # the same bytes again
    store.submit(Entry("b", answer(margin=0.3), data=image(2)), "low_margin")
    store.submit(Entry("c", answer(margin=0.02), data=image(3)), "low_margin")
    store.submit(Entry("d", answer(unknown=True), data=image(4)), "unknown")
    store.flush()
    write_label(tmp_path / "store", "a-copy", "dog")
    summary = export_captured(
        CapturedConfig(store=tmp_path / "store", output=tmp_path / "data", queue=None)
    )
    assert "1 copies dropped" in summary
    assert [p.name for p in (tmp_path / "data" / "dog").iterdir()] == ["a-copy.png"]
    with (tmp_path / "data-queue" / "queue.csv").open() as handle:
        order = [row["request_id"] for row in csv.DictReader(handle)]
    assert order == ["d", "c", "b"]  # unknown, then the smallest margin first
    with pytest.raises(DataError, match="exists"):
        export_captured(CapturedConfig(store=tmp_path / "store", output=tmp_path / "data"))


UNSAFE_LABELS = ["..", "../../escaped", "/abs", "a\\b", "nul\x00byte", ".hidden", "C:", " .."]


def test_the_export_labels_nothing_outside_its_folder_and_names_what_it_skipped(tmp_path):
    store_folder = tmp_path / "store"
    store = Counts().store(store_folder, max_bytes=10**9)
    image = lambda seed: bytes([137, 80, 78, 71]) + bytes([seed]) * 100  # noqa: E731
    for position, _ in enumerate(UNSAFE_LABELS):
        store.submit(Entry(f"bad{position}", answer(), data=image(position)), "sample")
    store.submit(Entry("good", answer(), data=image(99)), "sample")
    store.submit(Entry("order-7:a.5f0c", answer(), data=image(96)), "sample")  # ':' in the id
    store.submit(Entry("twice", answer(), data=image(98)), "sample")
    store.submit(Entry("twice", answer(), data=image(97)), "sample")  # the same id, two inputs
    store.flush()
    labels = store_folder / "labels"
    for position, label in enumerate(UNSAFE_LABELS):
        # Planted as a file: the service would have refused each one.
        (labels / f"bad{position}.json").parent.mkdir(exist_ok=True)
        (labels / f"bad{position}.json").write_text(
            json.dumps({"request_id": f"bad{position}", "label": label})
        )
    write_label(store_folder, "good", "cat")
    write_label(store_folder, "order-7:a.5f0c", "dog")
    write_label(store_folder, "twice", "dog")
    (labels / ".partial-crashed.json").write_text('{"request_id": "go')  # a crash mid-write
    (labels / "torn.json").write_text('{"request_id": "go')  # unreadable
    summary = export_captured(CapturedConfig(store=store_folder, output=tmp_path / "data"))
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.png"))
    exported = [path for path in written if path.startswith("data/")]
    # An id that is not a plain file name is written under its digest.
    assert exported[0] == "data/cat/good.png" and re.fullmatch(
        r"data/dog/id-[0-9a-f]{16}\.png", exported[1]
    ), exported
    assert len(exported) == 2 and not list(tmp_path.parent.glob("escaped*"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cat", "dog"]
    for position in range(len(UNSAFE_LABELS)):
        assert f"bad{position}" in summary  # named, with why
    assert "torn.json: unreadable" in summary and "held by another input" in summary
    assert ".partial-crashed" not in summary  # skipped silently: a file still being written


def test_a_new_writer_sweeps_label_files_left_half_written(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir(parents=True)
    old = time.time() - 120
    (labels / ".partial-dead.json").write_text("{")
    os.utime(labels / ".partial-dead.json", (old, old))
    (labels / ".partial-young.json").write_text("{")  # another worker is writing it now
    store = Counts().store(tmp_path, max_bytes=10**9)
    store.submit(Entry("new", answer(), data=b"\x89PNG"), "sample")
    store.flush()
    assert sorted(p.name for p in labels.iterdir()) == [".partial-young.json"]
