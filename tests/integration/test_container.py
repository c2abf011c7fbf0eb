"""The real images, run the way Kubernetes runs them: the serving image (built by
``deploy/image.sh`` from a Bento of the tiny model) under the settings of the Deployment rendered
from ``k8s/overlays/prod``, the batch-inference Jobs in it, and the training Job in the training
image. Every container setting comes from the rendered manifests (tests/kube.py)."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from benchmarks.servers import scrape, total
from tests import kube
from tests.helpers import ROOT, encode_image, write_class_folder

pytestmark = [pytest.mark.slow]

# The images the tests build carry this tag, never the user's :latest.
TEST_TAG = "test"


def with_test_tag(image: str) -> str:
    """The manifest's image with the tests' tag, as `kustomize edit set image` would set it."""
    name, _, _ = image.rpartition(":")
    return f"{name or image}:{TEST_TAG}"


@pytest.fixture(scope="session")
def prod_deployment() -> dict:
    return kube.find(kube.render("k8s/overlays/prod"), "Deployment")


@pytest.fixture(scope="session")
def serving_image(tiny_run, tmp_path_factory, prod_deployment) -> str:
    """The serving image of a Bento of the tiny model, by `deploy/image.sh serving`."""
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bentofile["models"] = ["tiny:latest"]  # the tiny model the session published
    for env in bentofile["envs"]:
        if env["name"] == "MODEL_NAME":
            env["value"] = "tiny"
    path = tmp_path_factory.mktemp("bento") / "bentofile.yaml"
    path.write_text(yaml.safe_dump(bentofile))
    bentoml = str(Path(sys.executable).parent / "bentoml")
    built = subprocess.run(
        [bentoml, "build", str(ROOT), "-f", str(path), "--output", "tag"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    bento = built.stdout.strip().removeprefix("__tag__:")
    image = with_test_tag(kube.Workload.of(prod_deployment).image)
    started = time.monotonic()
    output = kube.build_image("serving", image, "--bento", bento)
    summary = [line for line in output.splitlines() if line.startswith(f"image {image}")]
    print(f"\nserving image: {summary} ({time.monotonic() - started:.0f} s)")
    return image


def wait_ready(running: kube.Running, workload: kube.Workload) -> float:
    """Seconds until the startup probe's path answers 200; fails past the probe's budget (the
    kubelet would kill the container), or when the container stops."""
    probe = workload.container["startupProbe"]
    url = running.url(kube.probe_port(workload.container, probe)) + probe["httpGet"]["path"]
    budget = kube.probe_budget(probe)
    while True:
        elapsed = time.monotonic() - running.started
        try:
            if httpx.get(url, timeout=probe.get("timeoutSeconds", 1)).status_code == 200:
                return elapsed
        except httpx.HTTPError:
            pass
        state = running.inspect("{{.State.Status}}")
        assert state == "running", f"container {state}:\n{running.logs()[-4000:]}"
        assert elapsed < budget, f"not ready within the startup probe's {budget} s"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def deployed(serving_image, prod_deployment):
    """The prod Deployment's container, started once for the module's tests."""
    workload = kube.Workload.of(prod_deployment)
    with kube.run_pod(workload, serving_image) as running:
        ready = wait_ready(running, workload)
        yield running, workload, ready


def service_url(running: kube.Running, workload: kube.Workload) -> str:
    (port,) = [p["containerPort"] for p in workload.container["ports"] if p["name"] == "http"]
    return running.url(port)


@pytest.fixture(scope="module")
def animal_png() -> bytes:
    from training.data.sources import load_animals

    return encode_image(load_animals().pixels[0], "PNG")


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    from sklearn.datasets import images as sklearn_images

    return (Path(sklearn_images.__file__).parent / "china.jpg").read_bytes()


def expected(offline, data: bytes) -> dict:
    return offline.classify(offline.preprocess(data)[np.newaxis], 3).to_dicts()[0]


def test_the_container_runs_under_the_deployments_settings(deployed):
    running, workload, ready = deployed
    budget = kube.probe_budget(workload.container["startupProbe"])
    print(f"\nready in {ready:.1f} s (startup probe budget {budget} s)")
    config = json.loads(kube.podman("inspect", running.name).stdout)[0]
    uid, gid, _ = workload.user()
    assert config["Config"]["User"] == f"{uid}:{gid}"
    host = config["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["CapDrop"] and not host["CapAdd"]
    limits = workload.container["resources"]["limits"]
    assert host["Memory"] == kube.quantity(limits["memory"])
    assert host["NanoCpus"] == kube.quantity(limits["cpu"]) * 1e9
    # The process runs as that user, and nothing but the mounted volumes is writable.
    probe = kube.podman(
        "exec", running.name, "sh", "-c", "id -u; touch /home/bentoml/x", check=False
    )
    assert probe.stdout.split()[0] == str(uid) and "Read-only file system" in probe.stderr


def test_probes_and_endpoints_answer(deployed, offline, animal_png, photo_jpeg):
    running, workload, _ = deployed
    url = service_url(running, workload)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = workload.container[kind]
        port = kube.probe_port(workload.container, probe)
        answer = httpx.get(running.url(port) + probe["httpGet"]["path"], timeout=5)
        assert answer.status_code == 200, (kind, answer.text)
    for name, data in (("animal.png", animal_png), ("china.jpg", photo_jpeg)):
        response = httpx.post(f"{url}/classify", files={"image": (name, data)}, timeout=30)
        assert response.status_code == 200, response.text
        answer, reference = response.json(), expected(offline, data)
        assert answer["label"] == reference["label"]
        assert [e["label"] for e in answer["top_k"]] == [e["label"] for e in reference["top_k"]]
    from training.data.sources import load_animals

    images = load_animals().pixels[:2, ..., np.newaxis]
    body = {
        "inputs": [
            {"name": "image", "shape": list(images.shape), "datatype": "UINT8",
             "data": images.flatten().tolist()}
        ]
    }  # fmt: skip
    response = httpx.post(f"{url}/v2/models/{offline.name}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    output = outputs["probabilities"]
    np.testing.assert_allclose(
        np.asarray(output["data"], np.float32).reshape(output["shape"]),
        offline.classify(images, 1).predictions.probabilities,
        rtol=1e-5,
        atol=1e-6,
    )
    assert "classifier_predictions_total" in httpx.get(f"{url}/metrics", timeout=10).text
    page = httpx.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_metrics_stay_exact_across_workers_under_a_burst(deployed, animal_png):
    running, workload, _ = deployed
    url = service_url(running, workload)
    assert int(dict(workload.env())["WORKERS"]) >= 2
    before = scrape(url)
    good, bad = 96, 12

    def send(index: int) -> int:
        data = animal_png if index < good else b"not an image"
        with httpx.Client(timeout=30) as client:
            return client.post(f"{url}/classify", files={"image": ("a.png", data)}).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(send, range(good + bad)))
    assert statuses.count(200) == good and statuses.count(415) == bad, statuses
    for _ in range(6):  # whichever worker answers the scrape, the sums are the same
        after = scrape(url)
        for name, labels, count in [
            ("classifier_images_total", {"endpoint": "classify"}, good),
            ("classifier_predictions_total", {}, good),
            ("classifier_request_errors_total", {"error": "not_an_image"}, bad),
            ("classifier_preprocess_seconds_count", {}, good),
        ]:
            moved = total(after, name, **labels) - total(before, name, **labels)
            assert moved == count, (name, moved, count)


def test_runtime_files_are_on_the_pods_volumes(deployed):
    """prometheus-client's per-process files sit in the memory volume under BENTOML_HOME."""
    running, workload, _ = deployed
    home = workload.env()["BENTOML_HOME"]
    mount = next(m for m in workload.container["volumeMounts"] if home.startswith(m["mountPath"]))
    folder = running.volumes[mount["name"]] / Path(home).relative_to(mount["mountPath"])
    files = list((folder / "prometheus_multiproc_dir").glob("*.db"))
    assert files, sorted(str(p) for p in folder.rglob("*"))
    volume = next(v for v in workload.pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"].get("medium") == "Memory"


def test_it_never_restarted(deployed):
    running, _, _ = deployed
    assert running.inspect("{{.State.Status}}") == "running"
    assert running.inspect("{{.RestartCount}}") == "0"
    assert running.logs().count("Starting production HTTP BentoServer") == 1


def test_a_restart_inside_the_pod_keeps_the_metrics_right(
    serving_image, prod_deployment, animal_png
):
    """The kubelet restarts a killed container in the same pod, its emptyDir volumes kept: the
    new server empties prometheus-client's folder on the memory volume and counts afresh there."""
    workload = kube.Workload.of(prod_deployment)
    with kube.run_pod(workload, serving_image) as running:
        wait_ready(running, workload)
        url = service_url(running, workload)
        for _ in range(5):
            httpx.post(f"{url}/classify", files={"image": ("a.png", animal_png)}, timeout=30)
        home = workload.env()["BENTOML_HOME"]
        mount = next(
            m for m in workload.container["volumeMounts"] if home.startswith(m["mountPath"])
        )
        folder = running.volumes[mount["name"]] / Path(home).relative_to(mount["mountPath"])
        folder = folder / "prometheus_multiproc_dir"
        old = {path.name for path in folder.glob("*.db")}
        assert old
        os.kill(int(running.inspect("{{.State.Pid}}")), signal.SIGKILL)  # as an OOM kill would
        deadline = time.monotonic() + 60
        while running.inspect("{{.RestartCount}}") != "1":
            assert time.monotonic() < deadline, "podman did not restart it"
            time.sleep(0.2)
        running.started = time.monotonic()
        wait_ready(running, workload)
        restarted = time.time()
        for _ in range(7):
            response = httpx.post(
                f"{url}/classify", files={"image": ("a.png", animal_png)}, timeout=30
            )
            assert response.status_code == 200
        for _ in range(4):
            assert total(scrape(url), "classifier_images_total", endpoint="classify") == 7
        files = list(folder.glob("*.db"))
        assert files and all(path.stat().st_mtime >= restarted - 30 for path in files)


def test_the_model_is_readable_under_an_arbitrary_user_id(
    serving_image, prod_deployment, animal_png
):
    """As OpenShift runs pods: a random uid in group 0."""
    deployment = copy.deepcopy(prod_deployment)
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    context.update(runAsUser=1000650000, runAsGroup=0, fsGroup=1000650000)
    workload = kube.Workload.of(deployment)
    with kube.run_pod(workload, serving_image) as running:
        wait_ready(running, workload)
        url = service_url(running, workload)
        response = httpx.post(f"{url}/classify", files={"image": ("a.png", animal_png)}, timeout=30)
        assert response.status_code == 200, response.text


def half_sent_request(port: int, data: bytes) -> tuple[socket.socket, bytes]:
    """A /classify request whose headers and first half of body are sent; returns the socket and
    the rest of the body."""
    boundary = "testboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=90)
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def read_response(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def test_stop_during_load_drains_the_requests_in_flight(serving_image, prod_deployment, animal_png):
    """The kubelet's stop: the preStop sleep, then SIGTERM (podman stop), then SIGKILL after the
    rest of the grace period. Requests the server has begun complete; none gets an error."""
    workload = kube.Workload.of(prod_deployment)
    with kube.run_pod(workload, serving_image) as running:
        wait_ready(running, workload)
        url = service_url(running, workload)
        port = int(url.rsplit(":", 1)[1])
        outcomes: list[tuple[float, float, str]] = []
        stop_load = threading.Event()

        def load():
            while not stop_load.is_set():
                began = time.monotonic()
                try:
                    with httpx.Client(timeout=60) as client:  # a new connection per request
                        response = client.post(
                            f"{url}/classify", files={"image": ("a.png", animal_png)}
                        )
                    outcome = str(response.status_code)
                except httpx.TransportError as error:
                    outcome = type(error).__name__
                outcomes.append((began, time.monotonic(), outcome))

        threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        in_flight = [half_sent_request(port, animal_png) for _ in range(4)]
        time.sleep(workload.pre_stop_seconds)  # the preStop hook: still serving
        grace = workload.grace_seconds - workload.pre_stop_seconds
        sigterm = time.monotonic()
        stopper = threading.Thread(
            target=kube.podman, args=("stop", "--time", str(grace), running.name)
        )
        stopper.start()
        time.sleep(1.5)  # the server is draining now
        for sock, rest in in_flight:
            sock.sendall(rest)
        answers = [read_response(sock) for sock, _ in in_flight]
        stopper.join(timeout=grace + 30)
        stopped = time.monotonic()
        stop_load.set()
        for thread in threads:
            thread.join(timeout=90)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["label"]
        exit_code = int(running.inspect("{{.State.ExitCode}}"))
        assert exit_code != 137, "killed at the end of the grace period: it did not drain"
        assert stopped - sigterm < grace
        # Every request begun a second before SIGTERM or earlier got its answer, those in flight
        # then included. One begun in the last instant may still wait in the kernel's queue,
        # unseen by the server: at SIGTERM that connection is closed unanswered (what the preStop
        # sleep is for: by then the Service no longer routes here), at most one per client.
        before = [o for o in outcomes if o[0] < sigterm - 1]
        assert len(before) > 20 and all(o[2] == "200" for o in before), before[-5:]
        instant = [o[2] for o in outcomes if sigterm - 1 <= o[0] < sigterm]
        assert sum(o != "200" for o in instant) <= len(threads), instant
        # After SIGTERM a new connection may be refused or closed unanswered, but any answer is a
        # good one.
        after = [o[2] for o in outcomes if o[0] >= sigterm]
        assert all(o == "200" or not o.isdigit() for o in instant + after), instant + after
        print(
            f"stopped in {stopped - sigterm:.1f} s (exit {exit_code}); {len(before)} requests "
            f"before SIGTERM, in its last second: {sorted(set(instant))}, "
            f"after: {sorted(set(after))}"
        )


def readable_by_all(folder: Path) -> Path:
    """A volume's files as a shared volume holds them: readable by the pods' other users."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return folder


def test_the_batch_jobs_run_in_the_serving_image(serving_image, tiny_run, tmp_path):
    """k8s/batch-predict's Indexed Job, one pod per completion index, then the merge Job, on a
    data volume and the artifacts volume (the tiny model as animals/latest)."""
    job = copy.deepcopy(kube.find(kube.render("k8s/batch-predict"), "Job"))
    assert job["spec"]["completionMode"] == "Indexed"
    # Two shards: `completions` and SHARDS set together, as the README says.
    job["spec"]["completions"] = 2
    (shards,) = [e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
                 if e["name"] == "SHARDS"]  # fmt: skip
    shards["value"] = "2"
    data = tmp_path / "data"
    images = write_class_folder(data / "images", {"bear": 0, "cat": 1, "zebra": 2}, per_class=8)
    (images / "bear" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_run["output"] / "tiny", artifacts / "animals", symlinks=True)
    claims = {"classifier-batch-data": data, "classifier-artifacts": readable_by_all(artifacts)}
    for index in range(2):
        workload = kube.Workload.of(
            job, claims=claims, cluster_env={"JOB_COMPLETION_INDEX": str(index)}
        )
        result = kube.run_to_completion(workload, serving_image)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"shard {index}/2" in result.stdout
    merge = yaml.safe_load((ROOT / "k8s" / "batch-predict" / "merge-job.yaml").read_text())
    result = kube.run_to_completion(kube.Workload.of(merge, claims=claims), serving_image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "merged 2 shards" in result.stdout and "24 classified, 1 failed" in result.stdout
    assert "accuracy" in result.stdout
    rows = list(csv.DictReader((data / "results" / "merged.csv").open(newline="")))
    every = sorted(str(p.relative_to(data)) for p in images.rglob("*") if p.is_file())
    assert sorted(row["path"].removeprefix("/data/") for row in rows) == every


@pytest.fixture(scope="session")
def training_image() -> str:
    """The training image, by `deploy/image.sh training`."""
    job = kube.find(kube.render("k8s/training"), "Job")
    image = with_test_tag(kube.Workload.of(job).image)
    started = time.monotonic()
    output = kube.build_image("training", image)
    summary = [line for line in output.splitlines() if line.startswith(f"image {image}")]
    print(f"\ntraining image: {summary} ({time.monotonic() - started:.0f} s)")
    return image


def test_the_training_job_writes_a_complete_artifact(training_image, tmp_path):
    """k8s/training's Job, its arguments kept, plus a small generated folder and one epoch, and
    no data audit: its quick models were four fifths of this Job's time, and the audit is tested
    on its own (test_audit_jobs)."""
    job = copy.deepcopy(kube.find(kube.render("k8s/training"), "Job"))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["args"] += ["--data", "/data/photos", "--epochs", "1", "--audit", "off"]
    container["volumeMounts"].append(
        {"name": "photos", "mountPath": "/data/photos", "readOnly": True}
    )
    pod["volumes"].append(
        {"name": "photos", "persistentVolumeClaim": {"claimName": "photos", "readOnly": True}}
    )
    photos = write_class_folder(tmp_path / "photos", {"square": 0, "hbar": 1, "vbar": 2}, 20)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    claims = {"classifier-artifacts": artifacts, "photos": readable_by_all(photos)}
    started = time.monotonic()
    result = kube.run_to_completion(kube.Workload.of(job, claims=claims), training_image)
    print(f"\ntraining Job: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    name = container["args"][container["args"].index("--name") + 1]
    latest = artifacts / name / "latest"
    assert latest.is_symlink()
    folder = latest.resolve()
    for part in ("model.onnx", "metadata.json", "labels.json", "report.json"):
        assert (folder / part).is_file(), part
    assert json.loads((folder / "labels.json").read_text())
    # Nothing else: no staging folder left behind.
    assert sorted(p.name for p in (artifacts / name).iterdir()) == sorted(["latest", folder.name])
    # Readable by the service and the batch Jobs, which run under another user id.
    assert folder.stat().st_mode & 0o005 == 0o005
    # ... and the service's offline CLI reads it: the artifact is complete.
    from service.core.classifier import ModelSource, load_classifier

    classifier = load_classifier(ModelSource(folder, "test"))
    assert classifier.num_classes == 3
