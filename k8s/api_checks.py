"""What an API server or a kubelet would refuse, or run wrongly, checked offline on rendered
manifests; the schemas (kubernetes-validate) cannot see these, as they relate one field to another.

Usage: python k8s/api_checks.py RENDERED.yaml ...   (k8s/validate.sh runs it on every render)
Prints one line per problem and exits 1 if there is any."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# What the project's images set themselves (BentoML's Dockerfile template; training/Dockerfile)
# for the variables below, when a manifest does not.
IMAGE_DEFAULTS = {
    "image-classifier": {"HOME": "/home/bentoml", "BENTOML_HOME": "/home/bentoml"},
    "image-classifier-training": {"HOME": "/home/trainer", "MPLCONFIGDIR": "/tmp/matplotlib"},
}
# Folders a process writes when these variables name them (or their defaults above).
WRITTEN_VARIABLES = ("HOME", "TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "KERAS_HOME")


def pod_templates(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, pod spec) of each object that runs pods."""
    for obj in objects:
        if obj.get("kind") in WORKLOADS:
            yield obj, obj["spec"]["template"]["spec"]
        elif obj.get("kind") == "Pod":
            yield obj, obj["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod.get("containers", [])


def label(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions, or a Service's plain map) over labels."""
    plain = {k: v for k, v in selector.items() if k not in ("matchLabels", "matchExpressions")}
    wanted = {**plain, **selector.get("matchLabels", {})}
    if any(labels.get(key) != value for key, value in wanted.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_selectors(objects: list[dict]) -> list[str]:
    """A Deployment (ReplicaSet, StatefulSet, DaemonSet) whose selector does not match its own
    template's labels is refused."""
    problems = []
    for obj in objects:
        if obj.get("kind") in WORKLOADS - {"Job"}:
            selector = obj["spec"].get("selector") or {}
            labels = obj["spec"]["template"].get("metadata", {}).get("labels", {})
            if not selector or not selects(selector, labels):
                problems.append(f"{label(obj)}: selector {selector} does not match {labels}")
    return problems


def check_probe_ports(objects: list[dict]) -> list[str]:
    """A probe's named port must be a port of its container."""
    problems = []
    for obj, pod in pod_templates(objects):
        for container in containers(pod):
            names = {p.get("name") for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind) or {}
                for action in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(action) or {}).get("port")
                    if isinstance(port, str) and port not in names:
                        problems.append(
                            f"{label(obj)} {container['name']}: {kind} port '{port}' is not one "
                            f"of its ports {sorted(n for n in names if n)}"
                        )
    return problems


def check_volume_mounts(objects: list[dict]) -> list[str]:
    """Every volumeMounts entry names a volume of the pod (or a StatefulSet's claim template)."""
    problems = []
    for obj, pod in pod_templates(objects):
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        templates = obj.get("spec", {}).get("volumeClaimTemplates", [])
        volumes |= {template["metadata"]["name"] for template in templates}
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(
                        f"{label(obj)} {container['name']}: volumeMount '{mount['name']}' names "
                        "no volume of the pod"
                    )
    return problems


def written_paths(container: dict) -> dict[str, str]:
    """What the process writes: the folders of WRITTEN_VARIABLES, BentoML's home for a server of
    the serving image, and each --output argument. Returns {path: why}."""
    image = container.get("image", "").rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    env = {**IMAGE_DEFAULTS.get(image, {})}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    paths = {env.get("TMPDIR", "/tmp"): "temporary files (TMPDIR)"}
    for name in WRITTEN_VARIABLES:
        if name in env:
            paths[env[name]] = name
    if image == "image-classifier" and "command" not in container:
        paths[env["BENTOML_HOME"]] = "BENTOML_HOME (the server writes it at start-up)"
    words = []
    for part in container.get("command", []) + container.get("args", []):
        try:
            words += shlex.split(part)
        except ValueError:
            words += part.split()
    for index, word in enumerate(words[:-1]):
        if word == "--output" and words[index + 1].startswith("/"):
            paths[words[index + 1]] = "--output"
    return paths


def check_read_only_root(objects: list[dict]) -> list[str]:
    """With a read-only root file system, every folder the process writes is a writable mount."""
    problems = []
    for obj, pod in pod_templates(objects):
        for container in containers(pod):
            if not (container.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                continue
            writable = [
                PurePosixPath(m["mountPath"])
                for m in container.get("volumeMounts", [])
                if not m.get("readOnly")
            ]
            for path, why in written_paths(container).items():
                target = PurePosixPath(path)
                if not any(target == m or m in target.parents for m in writable):
                    problems.append(
                        f"{label(obj)} {container['name']}: writes {path} ({why}) on a read-only "
                        "root file system, and no writable volume is mounted there"
                    )
    return problems


def check_jobs(objects: list[dict]) -> list[str]:
    """A Job's pods restart Never or OnFailure; an Indexed Job has completions; a per-index
    backoff limit needs restartPolicy Never."""
    problems = []
    for obj in objects:
        if obj.get("kind") != "Job":
            continue
        spec = obj["spec"]
        policy = spec["template"]["spec"].get("restartPolicy", "Always")
        if policy not in ("Never", "OnFailure"):
            problems.append(
                f"{label(obj)}: restartPolicy {policy} (a Job needs Never or OnFailure)"
            )
        if spec.get("completionMode") == "Indexed":
            if not spec.get("completions"):
                problems.append(f"{label(obj)}: an Indexed Job needs completions")
            if "backoffLimitPerIndex" in spec and policy != "Never":
                problems.append(f"{label(obj)}: backoffLimitPerIndex needs restartPolicy Never")
    return problems


def check_disruption_budgets(objects: list[dict]) -> list[str]:
    """A PodDisruptionBudget sets exactly one of minAvailable and maxUnavailable."""
    return [
        f"{label(obj)}: sets {'both' if both else 'neither'} of minAvailable and maxUnavailable"
        for obj in objects
        if obj.get("kind") == "PodDisruptionBudget"
        for both in [("minAvailable" in obj["spec"]) and ("maxUnavailable" in obj["spec"])]
        if both or ("minAvailable" not in obj["spec"] and "maxUnavailable" not in obj["spec"])
    ]


def check_autoscalers(objects: list[dict]) -> list[str]:
    """minReplicas <= maxReplicas, and the target exists where the render holds workloads."""
    problems = []
    names = {(o.get("kind"), o.get("metadata", {}).get("name")) for o in objects}
    for obj in objects:
        if obj.get("kind") != "HorizontalPodAutoscaler":
            continue
        spec = obj["spec"]
        if spec.get("minReplicas", 1) > spec["maxReplicas"]:
            problems.append(
                f"{label(obj)}: minReplicas {spec['minReplicas']} > maxReplicas "
                f"{spec['maxReplicas']}"
            )
        target = (spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"])
        if target not in names:
            problems.append(f"{label(obj)}: scales {target[0]}/{target[1]}, not in this render")
    return problems


def check_services(objects: list[dict]) -> list[str]:
    """A Service's selector selects the pods of a workload of the render, and a named
    targetPort is a port of those pods."""
    problems = []
    templates = [
        (obj, obj["spec"]["template"].get("metadata", {}).get("labels", {}), pod)
        for obj, pod in pod_templates(objects)
        if obj.get("kind") != "Pod"
    ]
    for obj in objects:
        if obj.get("kind") != "Service" or not obj["spec"].get("selector"):
            continue
        selector = obj["spec"]["selector"]
        chosen = [(o, pod) for o, labels, pod in templates if selects(selector, labels)]
        if not chosen:
            problems.append(f"{label(obj)}: selector {selector} selects no pods of this render")
            continue
        ports = {
            p.get("name")
            for _, pod in chosen
            for c in pod["containers"]
            for p in c.get("ports", [])
        }
        for port in obj["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and target not in ports:
                problems.append(f"{label(obj)}: targetPort '{target}' is no port of its pods")
    return problems


def quantity(value) -> float:
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match:
        raise ValueError(f"not a quantity: {text}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def check_resources(objects: list[dict]) -> list[str]:
    """Each container's requests are within its limits."""
    problems = []
    for obj, pod in pod_templates(objects):
        for container in containers(pod):
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for name, request in requests.items():
                if name in limits and quantity(request) > quantity(limits[name]):
                    problems.append(
                        f"{label(obj)} {container['name']}: {name} request {request} is over "
                        f"its limit {limits[name]}"
                    )
    return problems


CHECKS: dict[str, Callable[[list[dict]], list[str]]] = {
    "selector": check_selectors,
    "probe ports": check_probe_ports,
    "volume mounts": check_volume_mounts,
    "read-only root": check_read_only_root,
    "jobs": check_jobs,
    "disruption budgets": check_disruption_budgets,
    "autoscalers": check_autoscalers,
    "services": check_services,
    "resources": check_resources,
}


def problems(objects: list[dict]) -> list[str]:
    return [problem for check in CHECKS.values() for problem in check(objects)]


def main(paths: list[str]) -> int:
    found = 0
    for path in paths:
        with open(path) as stream:
            objects = [doc for doc in yaml.safe_load_all(stream) if doc]
        for problem in problems(objects):
            print(f"{path}: {problem}", file=sys.stderr)
            found += 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
