"""How the code hangs together, checked on its source: imports run one way, and the model
contract's keys are spelled in one module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("training", "service")


def modules(package: str) -> dict[str, ast.Module]:
    return {
        f"{package}.{path.stem}": ast.parse(path.read_text())
        for path in sorted((ROOT / package).glob("*.py"))
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


def test_no_module_imports_a_sibling_inside_a_function():
    hidden = []
    for package in PACKAGES:
        for name, tree in modules(package).items():
            for function in ast.walk(tree):
                if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    hidden += [
                        f"{name}:{node.lineno} imports {imported}"
                        for imported, node in project_imports(function)
                    ]
    assert not hidden, hidden


def test_the_service_never_imports_training():
    offending = [
        f"{name} imports {imported}"
        for name, tree in modules("service").items()
        for imported, _ in project_imports(tree)
        if imported.startswith("training")
    ]
    assert not offending, offending


def test_the_import_graph_of_training_has_no_cycle():
    trees = modules("training")
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


def test_the_contract_and_the_onnx_metadata_are_spelled_in_one_module():
    from service.contract import ModelContract
    from service.preprocessing import ImageSpec

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
    assert list(spelled) == ["service/contract.py"], spelled
