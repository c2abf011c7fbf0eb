"""The Bento's packages are the serving set, and the serving code never needs TensorFlow."""

import subprocess
import sys
import tomllib

import yaml

from tests.helpers import ROOT, service_files


def test_bento_pins_equal_the_base_and_serving_sets():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["serve"]
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["python"]["packages"] == expected
    assert not [pin for pin in expected if pin.split("==")[0] in ("tensorflow", "keras", "tf2onnx")]


def test_bento_includes_every_service_module_and_nothing_of_training():
    import pathspec  # the matcher BentoML applies to bentofile.yaml's include patterns

    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    spec = pathspec.PathSpec.from_lines("gitwildmatch", bentofile["include"])
    candidates = [
        path.relative_to(ROOT).as_posix()
        for folder in ("service", "training", "tests", "benchmarks", "docs", "k8s")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    # Every module, the offline CLI included: the batch-inference Job runs the serving image.
    assert sorted(spec.match_files(candidates)) == service_files()
    assert {"service/core/contract.py", "service/cli/shards.py"} <= set(service_files())


def test_importing_the_service_loads_no_tensorflow():
    code = (
        "import sys, service.service, service.predict; "
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'training') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
