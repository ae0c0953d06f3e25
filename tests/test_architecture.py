"""The package's structure, checked from the source: every module imports, no import circles, no upward
imports between the layers, Optuna's private names only in search/_optuna_compat.py, and the torch-free
name tables of config/names.py equal to the registries they stand for.

The import graph is built with ``ast`` from every ``import`` statement of every module of
``evomerge_opt`` (top level and inside functions, ``TYPE_CHECKING`` blocks excluded: they never run).
An edge ``a -> b`` means module ``a`` names module ``b`` (``from pkg import name`` counts as ``pkg.name``
when that is a module, else ``pkg``); a package's ``__init__`` being run because a submodule is
imported is not an edge (Python's mechanics, not a dependency the code chose).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "evomerge_opt"
COMPAT = "evomerge_opt.search._optuna_compat"

# Lowest first. A module may import from its own layer or any layer below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "errors", "paths", "registry"),
    ("io", "config", "data"),  # config validates fitness datasets with data.spec (torch-free)
    ("pool",),
    ("merge",),
    ("dfs",),
    ("api", "fitness"),
    ("search", "modeltools", "zoo"),
    ("cli", "demo", ""),  # "": evomerge_opt/__init__.py (the lazy public API)
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import statement that can run."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                out.extend((alias.name, [], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                out.append((base, [alias.name for alias in child.names], child.lineno))
            visit(child)

    visit(tree)
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, _ in _imports(module):
            if not target.startswith("evomerge_opt"):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for hit in hits or [target]:
                if hit in MODULES and hit != module:
                    graph[module].add(hit)
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: its folder {top!r} is in no layer of LAYERS; add it where it belongs")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    graph = _edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports_between_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _edges().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_graph_sees_real_edges():
    """The checks above are only as good as the graph: known edges of each kind must be in it."""
    graph = _edges()
    assert "evomerge_opt.merge.build" in graph["evomerge_opt.api"]  # function-level import
    assert "evomerge_opt.config.names" in graph["evomerge_opt.config.recipe"]  # top level
    assert "evomerge_opt.data.records" in graph["evomerge_opt.data.windows"]  # `from pkg import module`
    assert "evomerge_opt.merge.sparsify.magnitude" in graph["evomerge_opt.merge.sparsify"]  # __init__
    assert "evomerge_opt.search._optuna_compat" in graph["evomerge_opt.search.budget"]


def test_private_optuna_names_only_in_the_compat_module():
    offenders = []
    for module in MODULES:
        if module == COMPAT:
            continue
        for target, names, line in _imports(module):
            if not (target == "optuna" or target.startswith("optuna.")):
                continue
            private = [p for p in target.split(".") if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                offenders.append(f"{module}:{line} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)
    # ... and the compat module really is where they are (the check would pass vacuously otherwise).
    compat_private = [t for t, _, _ in _imports(COMPAT) if t.startswith("optuna.") and "._" in t]
    assert compat_private


def test_config_name_tables_equal_the_registries():
    from evomerge_opt.config import names
    from evomerge_opt.merge.methods import METHODS
    from evomerge_opt.merge.sparsify import SPARSIFIERS
    from evomerge_opt.search.samplers import SAMPLERS, build_pruner

    assert tuple(METHODS.names()) == names.METHOD_NAMES
    assert set(SPARSIFIERS.names()) == set(names.SPARSIFIER_NAMES)
    assert tuple(SAMPLERS.names()) == names.SAMPLER_NAMES
    from evomerge_opt.config.space import PrunerSpec

    for pruner in names.PRUNER_NAMES:
        build_pruner(PrunerSpec(name=pruner, upper=1.0))  # every listed pruner can be built
