"""What an API server or a kubelet would refuse, checked offline (k8s/api_checks.py) on every
kustomization of k8s/ as rendered by kubectl, and on the manifests applied on their own; and each
check shown to fail on a copy broken on purpose."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

spec = importlib.util.spec_from_file_location("api_checks", ROOT / "k8s" / "api_checks.py")
api_checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api_checks)

KUBECTL = Path(sys.executable).parent / "kubectl"


def kustomizations() -> list[str]:
    """Every folder of k8s/ with a kustomization that renders on its own (not a Component)."""
    found = []
    for path in sorted((ROOT / "k8s").rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            found.append(str(path.parent.relative_to(ROOT)))
    return found


def render(folder: str) -> list[dict]:
    output = subprocess.run(
        [str(KUBECTL), "kustomize", folder], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    objects = {folder: render(folder) for folder in kustomizations()}
    merge = ROOT / "k8s" / "batch-predict" / "merge-job.yaml"  # applied alone (kubectl create -f)
    objects["k8s/batch-predict/merge-job.yaml"] = list(yaml.safe_load_all(merge.read_text()))
    return objects


def test_every_kustomization_is_covered(rendered):
    expected = ["k8s/base", "k8s/overlays/prod", "k8s/overlays/dev", "k8s/batch-predict"]
    expected += ["k8s/training", "k8s/training/multiworker", "k8s/training-backbone"]
    assert set(expected) <= set(rendered)


@pytest.mark.parametrize("check", sorted(api_checks.CHECKS))
def test_no_render_has_a_problem(rendered, check):
    found = {folder: api_checks.CHECKS[check](objects) for folder, objects in rendered.items()}
    assert not any(found.values()), found


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return obj


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def break_selector(objects):
    only(objects, "Deployment")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "x"


def break_probe_port(objects):
    container(only(objects, "Deployment"))["readinessProbe"]["httpGet"]["port"] = "metrics"


def break_volume_mount(objects):
    container(only(objects, "Deployment"))["volumeMounts"][0]["name"] = "scratch"


def break_read_only_root(objects):
    mounts = container(only(objects, "Deployment"))["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/tmp"]


def break_bentoml_home(objects):
    env = container(only(objects, "Deployment"))["env"]
    env[:] = [e for e in env if e["name"] != "BENTOML_HOME"]  # the image's /home/bentoml


def break_read_only_mount(objects):
    mounts = container(only(objects, "Deployment"))["volumeMounts"]
    next(m for m in mounts if m["mountPath"] == "/tmp")["readOnly"] = True


def break_indexed_job(objects):
    del only(objects, "Job")["spec"]["completions"]


def break_job_restart_policy(objects):
    only(objects, "Job")["spec"]["template"]["spec"]["restartPolicy"] = "Always"


def break_per_index_backoff(objects):
    only(objects, "Job")["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"


def break_disruption_budget(objects):
    only(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] = 1


def break_autoscaler(objects):
    only(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] = 11


def break_autoscaler_target(objects):
    only(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "classifier"


def break_service_selector(objects):
    only(objects, "Service")["spec"]["selector"] = {"app.kubernetes.io/name": "classifier"}


def break_service_port(objects):
    only(objects, "Service")["spec"]["ports"][0]["targetPort"] = "web"


def break_resources(objects):
    container(only(objects, "Deployment"))["resources"]["requests"]["memory"] = "3Gi"


def break_job_output(objects):
    job = only(objects, "Job")
    args = container(job)["args"]
    args[0] = args[0].replace("--output /data/results", "--output /results")


@pytest.mark.parametrize(
    ("check", "folder", "breaks", "message"),
    [
        ("selector", "k8s/overlays/prod", break_selector, "does not match"),
        ("probe ports", "k8s/overlays/prod", break_probe_port, "readinessProbe port 'metrics'"),
        ("volume mounts", "k8s/overlays/prod", break_volume_mount, "'scratch' names no volume"),
        ("read-only root", "k8s/overlays/prod", break_read_only_root, "writes /tmp"),
        ("read-only root", "k8s/overlays/prod", break_bentoml_home, "writes /home/bentoml "),
        ("read-only root", "k8s/overlays/dev", break_read_only_mount, "writes /tmp"),
        ("read-only root", "k8s/batch-predict", break_job_output, "writes /results (--output)"),
        ("jobs", "k8s/batch-predict", break_indexed_job, "needs completions"),
        ("jobs", "k8s/training", break_job_restart_policy, "restartPolicy Always"),
        ("jobs", "k8s/batch-predict", break_per_index_backoff, "needs restartPolicy Never"),
        ("disruption budgets", "k8s/overlays/prod", break_disruption_budget, "sets both"),
        ("autoscalers", "k8s/overlays/prod", break_autoscaler, "minReplicas 11 > maxReplicas 10"),
        ("autoscalers", "k8s/overlays/prod", break_autoscaler_target, "not in this render"),
        ("services", "k8s/overlays/prod", break_service_selector, "selects no pods"),
        ("services", "k8s/overlays/prod", break_service_port, "targetPort 'web'"),
        ("resources", "k8s/overlays/prod", break_resources, "memory request 3Gi is over"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_each_check_finds_its_broken_copy(rendered, check, folder, breaks, message):
    broken = copy.deepcopy(rendered[folder])
    breaks(broken)
    found = api_checks.CHECKS[check](broken)
    assert len(found) == 1 and message in found[0], found
    assert api_checks.CHECKS[check](rendered[folder]) == []


def test_the_script_fails_on_a_broken_render(rendered, tmp_path):
    broken = copy.deepcopy(rendered["k8s/overlays/prod"])
    break_disruption_budget(broken)
    (tmp_path / "good.yaml").write_text(yaml.safe_dump_all(rendered["k8s/overlays/prod"]))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump_all(broken))
    script = [sys.executable, str(ROOT / "k8s" / "api_checks.py")]
    assert subprocess.run([*script, str(tmp_path / "good.yaml")]).returncode == 0
    result = subprocess.run(
        [*script, str(tmp_path / "broken.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 1 and "PodDisruptionBudget/image-classifier" in result.stderr
