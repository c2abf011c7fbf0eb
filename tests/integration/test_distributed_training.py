"""Multi-worker training: two worker processes on loopback train together, one artifact."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, free_port

pytestmark = [pytest.mark.slow]


def test_two_workers_train_one_epoch_together_and_only_the_chief_writes(tmp_path):
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    output = tmp_path / "shared"  # one folder for both, as the PVC in Kubernetes
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "training",
                    "--distribute",
                    "multi-worker",
                    "--max-per-class",
                    "20",
                    "--epochs",
                    "1",
                    "--output",
                    str(output),
                    "--name",
                    "mw",
                    "--no-publish",
                    "--audit",  # tested on its own (test_audit_jobs)
                    "off",
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "TF_CONFIG": json.dumps(tf_config)},
            )
        )
    logs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=600)
        logs.append(out)
        assert worker.returncode == 0, out[-3000:]
    # Both saw the same, all-reduced numbers.
    first_epoch = [
        next(line for line in log.splitlines() if line.startswith("epoch 1/1")) for log in logs
    ]
    assert first_epoch[0] == first_epoch[1]
    assert "2 replicas in sync" in logs[0]
    assert "the chief evaluates and writes the artifacts" in logs[1]
    versions = [path for path in (output / "mw").iterdir() if path.name != "latest"]
    assert len(versions) == 1
    metadata = json.loads((versions[0] / "metadata.json").read_text())
    assert metadata["config"]["distribute"] == "multi-worker"
    assert metadata["export"]["parity"]["passed"]
    assert (output / "mw" / "latest").resolve() == versions[0].resolve()
