"""Schemathesis generates requests from the service's own OpenAPI spec: none may get a 5xx."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow]


def test_schemathesis_finds_no_server_error(server, tmp_path):
    model = httpx.get(f"{server}/model").json()
    config = tmp_path / "schemathesis.toml"
    # The model's real name and version, so /v2 requests reach the inference code, not a 404.
    config.write_text(
        f'[parameters]\n"path.name" = "{model["name"]}"\n"path.version" = "{model["version"]}"\n'
    )
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "--config-file",
            str(config),
            "run",
            f"{server}/docs.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--generation-deterministic",
            "--request-timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert " passed" in output and "failed" not in output.lower().split("summary")[-1]
    assert httpx.get(f"{server}/readyz").status_code == 200
