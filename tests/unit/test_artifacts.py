"""Artifact versions appear whole or not at all, and ``latest`` only moves to complete ones."""

import pytest

from training.artifacts import LATEST, read_json, staged_version, write_json


def test_a_complete_version_is_renamed_into_place_and_becomes_latest(tmp_path):
    with staged_version(tmp_path, "model") as (staging, version):
        write_json(staging / "metadata.json", {"version": version})
        assert not (tmp_path / "model" / version).exists()
    assert read_json(tmp_path / "model" / LATEST / "metadata.json") == {"version": version}
    assert (tmp_path / "model" / LATEST).resolve() == (tmp_path / "model" / version).resolve()


def test_a_failed_run_leaves_previous_versions_and_latest_untouched(tmp_path):
    with staged_version(tmp_path, "model") as (staging, first):
        write_json(staging / "metadata.json", {"version": first})
    with pytest.raises(RuntimeError), staged_version(tmp_path, "model") as (staging, _):
        write_json(staging / "metadata.json", {"version": "broken"})
        raise RuntimeError("training crashed")
    entries = sorted(path.name for path in (tmp_path / "model").iterdir())
    assert entries == sorted([first, LATEST])
    assert read_json(tmp_path / "model" / LATEST / "metadata.json") == {"version": first}


def test_versions_made_in_the_same_second_do_not_collide(tmp_path):
    versions = []
    for _ in range(3):
        with staged_version(tmp_path, "model") as (_, version):
            versions.append(version)
    assert len(set(versions)) == 3
    assert (tmp_path / "model" / LATEST).resolve().name == versions[-1]
