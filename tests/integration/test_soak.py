"""The soak run, short: concurrent clients, about 10% bad input, a worker killed half-way."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.slow]


def test_a_short_soak_passes(tiny_run, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--model",
            str(tiny_run["folder"]),
            "--duration",
            "12",
            "--concurrency",
            "8",
            "--json",
            str(tmp_path / "soak.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    assert result.returncode == 0, json.dumps(report["checks"], indent=2) + result.stderr[-2000:]
    assert report["passed"] and all(report["checks"].values())
    assert report["killed_worker"]["pid"] > 0
    assert report["server_errors_5xx"] == 0
    bad = sum(n for kind, n in report["sent_by_kind"].items() if kind != "good")
    assert bad > 0 and report["sent_by_kind"]["good"] > bad
    sent = report["error_counters_vs_bad_inputs_sent"]["sent"]
    assert set(sent) == {
        "not_an_image",
        "corrupt_image",
        "empty_file",
        "image_too_large",
        "missing_field",
        "body_too_large",
    }
