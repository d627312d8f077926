"""The package's layers: imports point one way (core, data, runtime at the bottom; seeds and cli
on top), with no cycles, and its modules stay small."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "distributed"

# What each layer may import from the package (besides itself).
ALLOWED = {
    "core": set(),
    "models": set(),
    "runtime": set(),
    "data": {"core"},
    "checkpoint": {"core", "data", "models"},
    "engine": {"core", "data"},
    "loop": {"core", "data", "runtime", "checkpoint"},
    "seeds": {"core", "data", "runtime", "checkpoint", "engine", "loop", "models"},
    "cli": {"core", "data", "runtime", "checkpoint", "engine", "loop", "seeds", "models"},
}


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if p.parent != PKG)


def _imported_layers(path: Path) -> set[str]:
    """Layers of the package that ``path`` imports (relative or absolute imports)."""
    tree = ast.parse(path.read_text())
    layer_parts = path.relative_to(PKG).parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(layer_parts[:-1])[: len(layer_parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                if not target and node.names:
                    target = [node.names[0].name]
            elif node.module and node.module.startswith("distributed."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                out.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("distributed."):
                    out.add(alias.name.split(".")[1])
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    layer = path.relative_to(PKG).parts[0]
    assert layer in ALLOWED, f"{layer} is not a known layer"
    bad = _imported_layers(path) - ALLOWED[layer] - {layer}
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {sorted(bad)}"


def test_layer_graph_has_no_cycles():
    seen, done = set(), set()

    def visit(layer, trail):
        assert layer not in seen - done, f"cycle: {' -> '.join(trail + [layer])}"
        if layer in done:
            return
        seen.add(layer)
        for dep in ALLOWED[layer]:
            visit(dep, trail + [layer])
        done.add(layer)

    for layer in ALLOWED:
        visit(layer, [])


def _sizes(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_functions_and_classes_stay_small(path):
    assert len(path.read_text().splitlines()) <= 430, f"{path} is over ~400 lines"
    for node, n in _sizes(path):
        limit = 260 if isinstance(node, ast.ClassDef) else 105
        assert n <= limit, f"{path.name}: {node.name} has {n} lines (limit ~{limit - 5})"
