"""Shards by a stable hash: every key in exactly one shard, the same on every run."""

import subprocess
import sys

import pytest

from service.cli.shards import BatchError, Shard


def test_every_key_falls_in_exactly_one_shard_and_the_shards_are_balanced():
    keys = [f"class{index % 7}/image_{index:06d}.jpg" for index in range(20000)]
    shards = [Shard(index, 8) for index in range(8)]
    owners = [[shard.index for shard in shards if shard.holds(key)] for key in keys]
    assert all(len(owner) == 1 for owner in owners)
    sizes = [sum(owner == [index] for owner in owners) for index in range(8)]
    assert min(sizes) > 0.9 * 20000 / 8 and max(sizes) < 1.1 * 20000 / 8


def test_the_hash_does_not_change_between_processes():
    # Python's own hash() of a str is salted per process; the shard must not be.
    code = (
        "from service.cli.shards import Shard; "
        "print([Shard(i, 7).holds(f'{k}/x.jpg') for i in range(7) for k in range(20)])"
    )
    answers = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        for _ in range(3)
    }
    assert len(answers) == 1


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "0/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(BatchError, match="expected I/N"):
        Shard.parse(text)


def test_a_shard_reads_back_as_written():
    assert (
        str(Shard.parse(" 2 / 10 ")) == "2/10" and Shard.parse("2/10").name == "part-00002-of-00010"
    )
