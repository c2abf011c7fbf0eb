"""How the code hangs together, checked on its source: imports run one way between the packages
(every module of every sub-package walked), no module does work at import, and the model
contract's keys are spelled in one module."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("training", "service")
# What each layer may import of the project, by module prefix. The entry modules
# service.service and service.predict sit above the layers and may import them.
IMPORT_RULE = {
    "service.core": ("service.core",),
    "service.registry": ("service.core", "service.registry"),
    "service.store": ("service.core", "service.store"),
    "service.http": ("service.core", "service.registry", "service.store", "service.http"),
    "service.cli": ("service.core", "service.registry", "service.cli"),
    "training": ("training", "service.core", "service.registry", "service.store"),
}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str, root: Path = ROOT) -> dict[str, ast.Module]:
    """Every module of ``package``, sub-packages included, by dotted name."""
    return {
        module_name(root, path): ast.parse(path.read_text())
        for path in sorted((root / package).rglob("*.py"))
    }


def project_imports(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """``(module, import node)`` for each import of a project package below ``node``."""
    found = []
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.module:
            names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
        elif isinstance(child, ast.Import):
            names = [alias.name for alias in child.names]
        else:
            continue
        found += [(name, child) for name in names if name.split(".")[0] in PACKAGES]
    return found


def layer_of(module: str) -> str | None:
    return next((layer for layer in IMPORT_RULE if module.startswith(layer)), None)


def rule_violations(root: Path = ROOT) -> list[str]:
    """Every import that crosses a layer the wrong way, as ``module imports module``."""
    found = []
    for package in PACKAGES:
        for name, tree in modules(package, root).items():
            layer = layer_of(name)
            if layer is None:
                continue
            for imported, node in project_imports(tree):
                if imported in ("service", "training"):
                    continue  # `from service import x` names a module; its own entry follows
                if not imported.startswith(IMPORT_RULE[layer]):
                    found.append(f"{name}:{node.lineno} imports {imported}")
    return found


# training/'s stages, bottom first: what each sub-package may import of training/ besides itself
# and the foundation (its configs and the artifact folder's layout). The job's entry, commands and
# the run's orchestration (training.cli, .commands, .train, .summary) sit above them all.
TRAINING_FOUNDATION = ("training.config", "training.command_config", "training.artifacts")
TRAINING_STAGES = {
    "training.data": (),
    "training.model": (),
    "training.fit": ("training.data", "training.model"),
    "training.quality": ("training.data", "training.model"),
    "training.export": ("training.data", "training.model", "training.quality"),
    "training.audit": ("training.data", "training.model", "training.quality"),
}


def stage_of(module: str) -> str | None:
    return next((stage for stage in TRAINING_STAGES if module.startswith(stage + ".")), None)


def stage_violations(root: Path = ROOT) -> list[str]:
    """Every import of a training sub-package that reaches a stage above it or beside it, or the
    orchestration above them all."""
    found = []
    for name, tree in modules("training", root).items():
        stage = stage_of(name)
        if stage is None:
            continue
        allowed = (stage, *TRAINING_STAGES[stage], *TRAINING_FOUNDATION)
        for imported, node in project_imports(tree):
            if imported == "training" or not imported.startswith("training"):
                continue  # `from training import artifacts` names a module; it follows
            if not any(
                imported == prefix or imported.startswith(prefix + ".") for prefix in allowed
            ):
                found.append(f"{name}:{node.lineno} imports {imported}")
    return found


def sub_package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Which sub-package of training/ imports which, from every module's imports."""
    graph = {stage: set() for stage in TRAINING_STAGES}
    for name, tree in modules("training", root).items():
        stage = stage_of(name)
        if stage is None:
            continue
        for imported, _ in project_imports(tree):
            other = stage_of(imported + ".")
            if other and other != stage:
                graph[stage].add(other)
    return graph


def test_training_sub_packages_import_only_the_stages_below_them():
    assert not stage_violations(), stage_violations()


def test_no_training_sub_package_imports_one_that_imports_it_back():
    graph = sub_package_graph()
    assert not [(a, b) for a in graph for b in graph[a] if a in graph[b]], graph
    # data/ is the bottom: it imports neither model/ nor fit/ (nor any other stage).
    assert graph["training.data"] == set()


def test_every_training_module_is_a_stage_or_the_top():
    unstaged = sorted(name for name in modules("training") if stage_of(name) is None)
    assert unstaged == [
        "training",
        "training.__main__",
        "training.artifacts",
        "training.audit",
        "training.cli",
        "training.command_config",
        "training.commands",
        "training.config",
        "training.data",
        "training.export",
        "training.fit",
        "training.model",
        "training.quality",
        "training.startup",
        "training.summary",
        "training.train",
    ]


def test_a_deliberate_stage_violation_is_caught(tmp_path):
    shutil.copytree(ROOT / "training", tmp_path / "training")
    labels = tmp_path / "training" / "data" / "labels.py"
    labels.write_text(labels.read_text() + "\nfrom training.model.cnn import build_cnn  # noqa\n")
    (tmp_path / "training" / "model" / "cam.py").write_text(
        "from training.export.gate import gate  # noqa\n"
    )
    assert sorted({v.split(":")[0] for v in stage_violations(tmp_path)}) == [
        "training.data.labels",
        "training.model.cam",
    ]
    assert sub_package_graph(tmp_path)["training.data"] == {"training.model"}


# What the model core may not import: it knows no web framework and no metrics.
SERVING_LIBRARIES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "aiohttp", "anyio")


def imported_modules(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """``(module, import node)`` for every import below ``node``, of any package."""
    found = []
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.module:
            found.append((child.module, child))
        elif isinstance(child, ast.Import):
            found += [(alias.name, child) for alias in child.names]
    return found


def core_imports_out_of_bounds(root: Path = ROOT) -> list[str]:
    """Imports of a serving library, or of BentoML, by the core (the model store is looked up
    by service.registry)."""
    found = []
    for name, tree in modules("service", root).items():
        if not name.startswith("service.core"):
            continue
        for module, node in imported_modules(tree):
            if module.split(".")[0] in (*SERVING_LIBRARIES, "bentoml"):
                found.append(f"{name}:{node.lineno} imports {module}")
    return found


def test_the_core_imports_no_web_framework_and_no_bentoml(tmp_path):
    assert not core_imports_out_of_bounds(), core_imports_out_of_bounds()
    shutil.copytree(ROOT / "service", tmp_path / "service")
    postprocessing = tmp_path / "service" / "core" / "postprocessing.py"
    postprocessing.write_text(postprocessing.read_text() + "\nimport bentoml  # noqa\n")
    assert core_imports_out_of_bounds(tmp_path) == [
        f"service.core.postprocessing:{len(postprocessing.read_text().splitlines())} imports "
        "bentoml"
    ]


def test_every_package_folder_is_a_package():
    for package in PACKAGES:
        folders = {path.parent for path in (ROOT / package).rglob("*.py")}
        assert all((folder / "__init__.py").is_file() for folder in folders), folders


def test_the_layers_import_only_what_the_rule_allows():
    assert not rule_violations(), rule_violations()


def test_a_deliberate_violation_is_caught(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    (tmp_path / "service" / "core" / "contract.py").write_text(
        (ROOT / "service" / "core" / "contract.py").read_text()
        + "\nfrom service.http.settings import ServiceSettings  # noqa\n"
    )
    (tmp_path / "service" / "cli" / "writers.py").write_text(
        "from service.http.metrics import get_metrics  # noqa\n"
    )
    assert sorted({violation.split(":")[0] for violation in rule_violations(tmp_path)}) == [
        "service.cli.writers",
        "service.core.contract",
    ]


def test_the_rule_covers_every_module_of_every_sub_package():
    layered = [name for package in PACKAGES for name in modules(package) if layer_of(name)]
    unlayered = [
        name for package in PACKAGES for name in modules(package) if layer_of(name) is None
    ]
    assert sorted(unlayered) == ["service", "service.predict", "service.service"]
    assert {"service.core.contract", "service.http.app", "service.cli.classify"} <= set(layered)


def test_no_module_imports_a_sibling_inside_a_function():
    hidden = []
    for package in PACKAGES:
        for name, tree in modules(package).items():
            if name == "training.__main__":
                continue  # sets TensorFlow's log level, then imports the job: see its main()
            for function in ast.walk(tree):
                if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    hidden += [
                        f"{name}:{node.lineno} imports {imported}"
                        for imported, node in project_imports(function)
                    ]
    assert not hidden, hidden


def test_the_import_graph_has_no_cycle():
    trees = {name: tree for package in PACKAGES for name, tree in modules(package).items()}
    graph = {
        name: {imported for imported, _ in project_imports(tree) if imported in trees}
        for name, tree in trees.items()
    }
    visiting, done = [], set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        if name in done:
            return
        visiting.append(name)
        for imported in graph[name]:
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


# The programs' entry modules: importing service.service runs the service's start-up on purpose
# (BentoML's decorators need its answers), and training.__main__ is the training program.
# Modules that are run, not imported: the entry points, and Alembic's environment script (Alembic
# executes it on the connection it is handed, service/store/database.py).
ENTRY_MODULES = {"service.service", "training.__main__", "service.store.migrations.env"}
IMPORT_CHECK = """
import importlib, json, os, sys
import onnxruntime
from service.http.settings import ServiceSettings

work = []
read = ServiceSettings.from_env.__func__
def reading(cls, *args):
    work.append("settings read")
    return read(cls, *args)
ServiceSettings.from_env = classmethod(reading)
session = onnxruntime.InferenceSession.__init__
def opened(self, *args, **kwargs):
    work.append("model loaded")
    return session(self, *args, **kwargs)
onnxruntime.InferenceSession.__init__ = opened
found = {}
for name in sys.argv[1:]:
    if name.startswith("training"):
        import keras  # noqa: F401  (what Keras and TensorFlow do at import is theirs)
    before = dict(os.environ)
    importlib.import_module(name)
    if dict(os.environ) != before:
        work.append("environment written")
    if name.startswith("service") and "tensorflow" in sys.modules:
        work.append("tensorflow imported")
    if work:
        found[name] = sorted(set(work))
        work.clear()
print(json.dumps(found))
"""


def imports_that_work(names: list[str]) -> dict[str, list[str]]:
    """What importing each of ``names`` (in order, in one fresh process) did beyond defining
    names, with settings that would make any start-up show: a model that is not there, and auto
    batching, which would time it and write its decision to the environment."""
    env = {"PATH": "/usr/bin:/bin", "MODEL_PATH": "/nonexistent", "BATCHING": "auto"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_a_module_reads_no_settings_loads_nothing_and_writes_no_environment():
    # The service's modules first, so that "tensorflow imported" names the service's own.
    names = sorted(
        (name for package in PACKAGES for name in modules(package) if name not in ENTRY_MODULES),
        key=lambda name: (not name.startswith("service"), name),
    )
    assert imports_that_work(names) == {}


def test_the_import_check_sees_the_start_up_of_the_entry_module():
    assert imports_that_work(["service.service"]) == {
        "service.service": ["environment written", "settings read"]
    }


def test_the_contract_and_the_onnx_metadata_are_spelled_in_one_module():
    from service.core.contract import ModelContract
    from service.core.preprocessing import ImageSpec

    # The keys that only the contract has (others, such as "labels", are also words of the API).
    own_keys = {"data_fingerprint", "data_source", "input_range", "input_name", "output_name"}
    # They are keys the contract really writes: renaming one makes this test name the new one.
    example = ModelContract("m", "1", ("a", "b"), ImageSpec(8, 8, 1))
    assert own_keys <= set(example.to_onnx_props())
    spelled = {}
    for folder in ("service", "training", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            words = {key for key in own_keys if f'"{key}"' in text or f"'{key}'" in text}
            if "metadata_props" in text or "custom_metadata_map" in text:
                words.add("metadata_props")
            # The contract's own tests may look at the raw metadata; this test names the keys.
            if words and path.name not in ("test_code_structure.py", "test_contract.py"):
                spelled[str(path.relative_to(ROOT))] = sorted(words)
    assert list(spelled) == ["service/core/contract.py"], spelled


MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for folder in ("training", "service", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long
