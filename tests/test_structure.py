"""The shape of the house: imports point one way (no circles among the project's modules; models and
data never import pretrain or each other), and pretrain's functions stay short enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("pretrain", "models", "data")
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}


def imports(path: Path, known) -> set[str]:
    """The project modules a module imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_import_circle():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    for m, deps in graph.items():
        if m.startswith("models."):
            assert not {d for d in deps if d.startswith(("pretrain.", "data."))}, (m, deps)
        if m.startswith("data."):
            assert not {d for d in deps if d.startswith(("pretrain.", "models."))}, (m, deps)


def test_no_function_in_pretrain_is_longer_than_a_screen():
    long = []
    for path in sorted((ROOT / "pretrain").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_configs_load_without_jax():
    """Launchers and tools read configs without loading a framework: the schema and its loading
    import no JAX."""
    code = ("import sys; from pretrain import config; config.load(config.preset_path('llm', '8b')); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
