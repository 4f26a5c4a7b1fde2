"""The package layout: public APIs at the top of each package, no import circles, no import from a higher layer.

Layers, lowest first: sparse_ops (formats, kernels, layers, loading) < prune (pruning, the CLI). benchmarks/
holds study scripts and results and is not imported by either package.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_ops", "prune")
LAYER = {"sparse_ops": 0, "prune": 1, "benchmarks": 2}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (from-imports resolved to the module or its package)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = {m for m in _imports(path, top_level_only) if m in files}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in edges if m != name and not (path.name == "__init__.py" and m.startswith(package))}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, stack + [nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_circles_between_modules():
    assert _cycle(_graph(top_level_only=True)) is None


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for m in _imports(path, top_level_only=False):
                top = m.split(".")[0]
                if top in LAYER and LAYER[top] > LAYER[pkg]:
                    bad.append(f"{_module_name(path)} imports {m}")
    assert not bad


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_and_says_what_it_is(package):
    mod = importlib.import_module(package)
    assert mod.__all__ and mod.__doc__
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert name.startswith("__") or (obj.__doc__ or "").strip(), f"{package}.{name} has no docstring"


def test_a_new_user_finds_the_main_entry_points_at_the_top():
    import sparse_ops
    from sparse_ops import CSR, SparseLinear, sparsify  # noqa: F401 (raised ImportError before 0.2)

    assert callable(sparse_ops.sparsify) and callable(sparse_ops.convert_checkpoint)
    with pytest.raises(AttributeError, match="public names: .*SparseLinear"):
        sparse_ops.SparseLinar  # noqa: B018 (a typo gets the list of names)
