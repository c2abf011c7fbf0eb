"""TF_CONFIG from a Kubernetes Indexed Job's completion index, and who is the chief."""

import json

import pytest

from training.config import ConfigError
from training.fit.distribute import ensure_tf_config, is_chief


def test_tf_config_is_built_from_the_completion_index():
    environ = {
        "TRAINING_WORKER_HOSTS": "w-0.svc:2222\nw-1.svc:2222, w-2.svc:2222",
        "JOB_COMPLETION_INDEX": "1",
    }
    tf_config = ensure_tf_config(environ)
    assert tf_config == {
        "cluster": {"worker": ["w-0.svc:2222", "w-1.svc:2222", "w-2.svc:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    assert json.loads(environ["TF_CONFIG"]) == tf_config
    assert not is_chief(tf_config)


def test_an_explicit_tf_config_wins_and_worker_zero_is_chief():
    given = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}
    assert ensure_tf_config({"TF_CONFIG": json.dumps(given), "JOB_COMPLETION_INDEX": "1"}) == given
    assert is_chief(given) and is_chief(None)
    with_chief = {
        "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
        "task": {"type": "worker", "index": 0},
    }
    assert not is_chief(with_chief)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"TRAINING_WORKER_HOSTS": "a:1"},
        {"TRAINING_WORKER_HOSTS": "a:1", "JOB_COMPLETION_INDEX": "3"},
        {"TF_CONFIG": "{not json"},
    ],
)
def test_missing_or_inconsistent_cluster_settings_are_clear_errors(environ):
    with pytest.raises(ConfigError):
        ensure_tf_config(environ)


def test_the_multi_worker_manifest_names_every_pod_of_its_indexed_job():
    from pathlib import Path

    import yaml

    from training.fit.distribute import ensure_tf_config as build

    path = Path(__file__).resolve().parents[2] / "k8s" / "training" / "multiworker" / "job.yaml"
    service, job = yaml.safe_load_all(path.read_text())
    pod = job["spec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in pod["containers"][0]["env"]}
    port = service["spec"]["ports"][0]["port"]
    expected = [
        f"{job['metadata']['name']}-{index}.{service['metadata']['name']}:{port}"
        for index in range(job["spec"]["completions"])
    ]
    tf_config = build(
        {"TRAINING_WORKER_HOSTS": env["TRAINING_WORKER_HOSTS"], "JOB_COMPLETION_INDEX": "0"}
    )
    assert tf_config["cluster"]["worker"] == expected
    assert (
        pod["subdomain"] == service["metadata"]["name"]
        and job["spec"]["completionMode"] == "Indexed"
    )
