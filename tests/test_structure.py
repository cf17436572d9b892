"""The shape of the house: imports point down the layers (no circles; models and data never import
pretrain or each other; the training core never imports formats or inference), every function in
pretrain, models and data stays short enough to read, and every module has its tests named in
conftest.py's index."""

import ast
import subprocess
import sys
from pathlib import Path

import conftest
from conftest import ROOT

PACKAGES = ("pretrain", "models", "data")
MAX_FUNCTION_LINES = 60
# The units of the project, lowest first: a unit imports only units of lower layers (and itself).
LAYERS = (
    ("models", "data"),
    ("pretrain.tpu",),
    ("pretrain.config",),
    ("pretrain.metrics", "pretrain.run", "pretrain.evals"),
    ("pretrain.train", "pretrain.formats"),
    ("pretrain.tasks",),
    ("pretrain.build",),
    ("pretrain.inference", "pretrain.plan"),
    ("pretrain.cli",),
    ("pretrain.__main__", "pretrain"),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    """Every module of the project, subpackages included, by dotted name (a package by its own name)."""
    found = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def imports(path: Path, known) -> set[str]:
    """The project modules a module imports, anywhere in it (inside functions too): `from a import b`
    imports a.b where that is a module, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def unit(module: str) -> str:
    """models, data, pretrain (its __init__), or pretrain's top-level module or subpackage."""
    parts = module.split(".")
    return parts[0] if parts[0] != "pretrain" else ".".join(parts[:2])


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_no_import_circle():
    edges, state = graph(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(edges[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(edges):
        visit(m, [])


def test_imports_point_down_the_layers():
    """Every pair of units: an import goes to a lower layer, never across or up."""
    wrong = []
    for m, deps in graph().items():
        assert unit(m) in LEVEL, f"{m}: unit {unit(m)} is in no layer of LAYERS; place it there"
        for d in deps:
            if unit(d) != unit(m) and LEVEL[unit(d)] >= LEVEL[unit(m)]:
                wrong.append(f"{m} imports {d}")
    assert not wrong, wrong


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(modules().values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_every_module_has_its_tests_in_the_index():
    """conftest.py's docstring maps each module (a package's __init__ with code included) to the test
    files that test it; each named file exists, and each test file is named."""
    index = {}
    for line in conftest.__doc__.split("Where each module is tested:", 1)[1].strip().splitlines():
        name, *tests = line.split()
        index[name] = tests
    with_code = {m for m, p in modules().items() if len(ast.parse(p.read_text()).body) > 1 or p.stem != "__init__"}
    assert sorted(with_code - set(index)) == [], "modules missing from the index"
    assert sorted(set(index) - with_code - {"*"}) == [], "index entries that are no module"
    named = {t for tests in index.values() for t in tests}
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert named - files == set(), "index names test files that do not exist"
    assert files - named == set(), "test files the index does not name"


def test_configs_load_without_jax():
    """Launchers and tools read configs without loading a framework: the schema and its loading
    import no JAX."""
    code = ("import sys; from pretrain import config; config.load(config.preset_path('llm', '8b')); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


if __name__ == "__main__":  # the units and what each imports: python tests/test_structure.py
    by_unit = {}
    for m, deps in graph().items():
        by_unit.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    for level, units in reversed(list(enumerate(LAYERS))):
        for u in units:
            print(f"{level}  {u:20} -> {', '.join(sorted(by_unit.get(u, ()), key=lambda d: (-LEVEL[d], d))) or '-'}")
