"""The Bento's packages are the serving set, and the serving code never needs TensorFlow."""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_bento_pins_equal_the_base_and_serving_sets():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["serve"]
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["python"]["packages"] == expected
    assert not [pin for pin in expected if pin.split("==")[0] in ("tensorflow", "keras", "tf2onnx")]


def test_bento_includes_every_service_module_and_nothing_of_training():
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    # Every module, the offline CLI included: the batch-inference Job runs the serving image.
    served = [str(path.relative_to(ROOT)) for path in (ROOT / "service").glob("*.py")]
    assert sorted(bentofile["include"]) == sorted([*served, "service/static/index.html"])


def test_importing_the_service_loads_no_tensorflow():
    code = (
        "import sys, service.service, service.predict; "
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'training') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
