"""`bentoml build` of the serving Bento, and the Kubernetes manifests' validation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, service_files

pytestmark = [pytest.mark.slow]


def test_bentoml_build_makes_a_bento_without_tensorflow(tiny_run, tmp_path):
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    bentofile["models"] = ["tiny:latest"]  # the tiny model the session published
    (tmp_path / "bentofile.yaml").write_text(yaml.safe_dump(bentofile))
    bentoml = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run(
        [bentoml, "build", str(ROOT), "-f", str(tmp_path / "bentofile.yaml"), "--output", "tag"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().removeprefix("__tag__:")
    assert tag.startswith("image-classifier:")
    import bentoml as bentoml_api

    bento = bentoml_api.get(tag)
    folder = Path(bento.path)
    requirements = (folder / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements
    for heavy in ("tensorflow", "keras", "tf2onnx", "scikit-learn", "matplotlib"):
        assert heavy not in requirements
    assert not (folder / "src" / "training").exists()
    # The whole service package, the offline CLI included: the batch-inference Job runs it from
    # the same image.
    shipped = sorted(
        path.relative_to(folder / "src").as_posix()
        for path in (folder / "src" / "service").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )
    assert shipped == service_files()
    assert [str(model.tag) for model in bento.info.models][0].startswith("tiny:")


def test_manifests_render_and_validate():
    result = subprocess.run(
        ["bash", "k8s/validate.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for overlay in ("k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/batch-predict"):
        assert f"ok: {overlay}" in result.stdout


def test_an_invalid_manifest_is_refused(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ROOT / "k8s" / "base" / "service.yaml", broken / "service.yaml")
    text = (broken / "service.yaml").read_text().replace("targetPort:", "targetPorts:")
    (broken / "service.yaml").write_text(text)
    (broken / "kustomization.yaml").write_text("resources:\n  - service.yaml\n")
    result = subprocess.run(
        ["bash", "k8s/validate.sh", str(broken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "targetPorts" in result.stdout + result.stderr
