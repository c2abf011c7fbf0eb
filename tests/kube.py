"""Kubernetes workloads run with podman, the way a kubelet would run them: every container setting
is read from the rendered manifests (``kubectl kustomize``) and translated, never restated.

A setting this module does not translate is refused (``Unsupported``), so that a new field in a
manifest cannot be silently dropped from what the tests run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"

# Container fields translated below, or with no effect on one container run here (pull policy,
# ports that only name what the image listens on, probes that the tests drive themselves).
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "env", "ports",
    "resources", "securityContext", "volumeMounts", "startupProbe", "readinessProbe",
    "livenessProbe", "lifecycle",
}  # fmt: skip
POD_FIELDS = {
    "containers", "volumes", "securityContext", "restartPolicy", "terminationGracePeriodSeconds",
    "serviceAccountName", "automountServiceAccountToken", "subdomain",
}  # fmt: skip


class Unsupported(Exception):
    """A manifest setting that the translation to podman does not cover."""


def podman_env() -> dict:
    return {
        **os.environ,
        "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF)),
    }


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs):
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env(),
        **kwargs,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return result


def render(kustomization: str | Path) -> list[dict]:
    """The objects of ``kubectl kustomize <kustomization>``, as the cluster would receive them."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(kustomization)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("2", "500m", "64Mi", "1G") as a number (bytes, cores)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise Unsupported(f"quantity {text!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def probe_budget(probe: dict) -> float:
    """Seconds a probe allows before the kubelet gives up (the startup probe's budget)."""
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )


def probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


@dataclass
class Workload:
    """One container of a pod template, with its pod's settings."""

    pod: dict
    container: dict
    # claimName -> host folder, for persistentVolumeClaim volumes.
    claims: dict[str, Path] = field(default_factory=dict)
    # Extra environment the cluster adds (JOB_COMPLETION_INDEX for an Indexed Job's pod).
    cluster_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, obj: dict, container: str | None = None, **kwargs) -> Workload:
        pod = obj["spec"]["template"]["spec"]
        containers = pod["containers"]
        chosen = next(c for c in containers if container in (None, c["name"]))
        return cls(pod, chosen, **kwargs)

    @property
    def image(self) -> str:
        return self.container["image"]

    @property
    def grace_seconds(self) -> int:
        return self.pod.get("terminationGracePeriodSeconds", 30)

    @property
    def pre_stop_seconds(self) -> int:
        pre_stop = self.container.get("lifecycle", {}).get("preStop")
        if pre_stop is None:
            return 0
        if set(pre_stop) != {"sleep"}:
            raise Unsupported(f"preStop {sorted(pre_stop)}")
        return pre_stop["sleep"]["seconds"]

    def env(self) -> dict[str, str]:
        values = {}
        for entry in self.container.get("env", []):
            if "value" not in entry:
                raise Unsupported(f"env {entry['name']} without a plain value")
            values[entry["name"]] = entry["value"]
        return {**values, **self.cluster_env}

    def user(self) -> tuple[int, int, list[int]]:
        """(uid, gid, supplementary groups) from the pod's and the container's security context."""
        context = {
            **self.pod.get("securityContext", {}),
            **self.container.get("securityContext", {}),
        }
        if "runAsUser" not in context or "runAsGroup" not in context:
            raise Unsupported("a pod without runAsUser and runAsGroup runs as the image's user")
        groups = list(context.get("supplementalGroups", []))
        if "fsGroup" in context:
            groups.append(context["fsGroup"])
        return context["runAsUser"], context["runAsGroup"], groups

    def run_args(
        self, volumes: dict[str, Path], ports: dict[int, int], restart: bool = True
    ) -> list[str]:
        """``podman run`` options for this container: everything but the image and its arguments.

        Args:
            volumes: volume name -> host folder (made by ``volumes()``).
            ports: containerPort -> loopback host port.
        """
        unknown = set(self.container) - CONTAINER_FIELDS
        unknown |= set(self.pod) - POD_FIELDS
        if unknown:
            raise Unsupported(f"fields {sorted(unknown)}")
        if len(self.pod["containers"]) != 1 or self.pod.get("initContainers"):
            raise Unsupported("pods of several containers")
        pod_context = self.pod.get("securityContext", {})
        context = self.container.get("securityContext", {})
        uid, gid, groups = self.user()
        if pod_context.get("runAsNonRoot") and uid == 0:
            raise AssertionError("runAsNonRoot with runAsUser 0: the kubelet refuses to start it")
        args = ["--user", f"{uid}:{gid}"]
        for group in groups:
            args += ["--group-add", str(group)]
        if context.get("privileged"):
            raise Unsupported("privileged containers")
        if context.get("readOnlyRootFilesystem"):
            # podman's --read-only adds writable /tmp, /run and /var/tmp; the kubelet does not.
            args += ["--read-only", "--read-only-tmpfs=false"]
        capabilities = context.get("capabilities", {})
        args += [f"--cap-drop={cap}" for cap in capabilities.get("drop", [])]
        args += [f"--cap-add={cap}" for cap in capabilities.get("add", [])]
        if context.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = {**pod_context, **context}.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp != "RuntimeDefault":
            raise Unsupported(f"seccompProfile {seccomp}")  # podman's default is the runtime's
        limits = self.container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += ["--cpus", f"{quantity(limits['cpu']):g}"]
        if "memory" in limits:
            args += ["--memory", str(int(quantity(limits["memory"])))]
        for name, value in self.env().items():
            args += ["--env", f"{name}={value}"]
        if "workingDir" in self.container:
            args += ["--workdir", self.container["workingDir"]]
        if "command" in self.container:
            args += ["--entrypoint", json.dumps(self.container["command"])]
        for mount in self.container.get("volumeMounts", []):
            if set(mount) - {"name", "mountPath", "readOnly"}:
                raise Unsupported(f"volumeMount fields {sorted(mount)}")
            mode = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{volumes[mount['name']]}:{mount['mountPath']}:{mode}"]
        for container_port, host_port in ports.items():
            args += ["--publish", f"127.0.0.1:{host_port}:{container_port}"]
        if restart:  # the kubelet restarts a container that exits (restartPolicy Always)
            policy = self.pod.get("restartPolicy", "Always")
            args += ["--restart", {"Always": "always", "OnFailure": "on-failure"}.get(policy, "no")]
        return args

    def arguments(self) -> list[str]:
        return list(self.container.get("args", []))

    @contextlib.contextmanager
    def volumes(self) -> Iterator[dict[str, Path]]:
        """Host folders for the pod's volumes, as the kubelet makes them: an ``emptyDir`` is a
        tmpfs of its size limit that outlives a restart of the container (the pod's lifetime), a
        ``persistentVolumeClaim`` the folder given for its claim. fsGroup owns the writable
        ones."""
        fs_group = self.pod.get("securityContext", {}).get("fsGroup")
        folders: dict[str, Path] = {}
        mounted: list[Path] = []
        root = Path(tempfile.mkdtemp(prefix="kubelet-volumes-"))
        try:
            for volume in self.pod.get("volumes", []):
                name = volume["name"]
                if "emptyDir" in volume:
                    folder = root / name
                    folder.mkdir()
                    size = volume["emptyDir"].get("sizeLimit")
                    options = "mode=1777" + (f",size={int(quantity(size))}" if size else "")
                    subprocess.run(
                        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True
                    )
                    mounted.append(folder)
                elif "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    if claim not in self.claims:
                        raise Unsupported(f"no host folder given for claim {claim}")
                    folder = self.claims[claim]
                    if fs_group is not None and not volume["persistentVolumeClaim"].get("readOnly"):
                        for path in [folder, *folder.rglob("*")]:
                            os.chown(path, -1, fs_group, follow_symlinks=False)
                            if path.is_dir() and not path.is_symlink():
                                path.chmod(path.stat().st_mode | 0o2070)
                else:
                    raise Unsupported(f"volume {name}: {sorted(volume)}")
                folders[name] = folder
            yield folders
        finally:
            for folder in mounted:
                subprocess.run(["umount", "-l", str(folder)], check=False)
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class Running:
    name: str
    ports: dict[int, int]
    volumes: dict[str, Path]
    started: float

    def url(self, container_port: int) -> str:
        return f"http://127.0.0.1:{self.ports[container_port]}"

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr


def free_port() -> int:
    from tests.helpers import free_port as pick

    return pick()


@contextlib.contextmanager
def run_pod(workload: Workload, image: str | None = None, name_prefix: str = "k8s-test"):
    """Start the workload's container detached; yield a ``Running``; remove it afterwards."""
    name = f"{name_prefix}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    ports = {p["containerPort"]: free_port() for p in workload.container.get("ports", [])}
    with workload.volumes() as volumes:
        args = workload.run_args(volumes, ports)
        try:
            podman("run", "--detach", "--name", name, *args, image or workload.image,
                   *workload.arguments())  # fmt: skip
            yield Running(name, ports, volumes, time.monotonic())
        finally:
            podman("rm", "--force", "--time", "0", name, check=False)


def run_to_completion(workload: Workload, image: str | None = None, timeout: float = 900):
    """Run the workload's container in the foreground (a Job's pod); returns the CompletedProcess
    with its output."""
    with workload.volumes() as volumes:
        args = workload.run_args(volumes, {}, restart=False)
        return podman("run", "--rm", *args, image or workload.image, *workload.arguments(),
                      check=False, timeout=timeout)  # fmt: skip


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def build_image(kind: str, tag: str, *extra: str, timeout: float = 1800) -> str:
    """``deploy/image.sh KIND --tag TAG``; the image it replaces under that tag is removed, so that
    repeated runs do not pile up images. Returns the build's output."""
    old = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    result = subprocess.run(
        ["bash", "deploy/image.sh", kind, "--tag", tag, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=podman_env(),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    new = podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    if old and old != new:
        podman("rmi", old, check=False)
    return result.stdout + result.stderr
