"""The import graph, imports inside functions included: no circles and no arrow back up the layers.

docs/architecture.md draws the layers; this test reads every module of the library with ``ast``
(nothing is imported, so an import hidden in a function counts as much as one at the top).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders installed inside the autopeft namespace (pyproject's package-dir).
MAPPED = {"backbones": "autopeft.backbones", "search_spaces": "autopeft.search_spaces"}

# docs/architecture.md's layers, bottom (0) to top. A module imports only its own layer or lower ones.
LAYER_OF_TOP_MODULE = {
    "finetuning": 1, "pretraining": 1, "train": 1, "evaluation": 1, "importance": 1,
    "runs": 2, "artifacts": 2,
    "search": 3,
    "runner": 4,
    "model_loading": 5, "inference": 5, "bundle": 5,
    "report": 6,
    "cli": 7,
}  # everything else (peft, backbones, data, metrics, stats, tables, errors, _io, _plugins, checkpoints): 0

# Where a registry loads what fills it, the arrow back is its purpose: the backbone registry
# (backbones/base.py) registers the users' networks of $AUTOPEFT_NETWORKS (backbones/network.py,
# which subclasses base's Backbone) before every look-up.
REGISTRY_LOADS = {("autopeft.backbones.base", "autopeft.backbones.network")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in MAPPED:
        parts = MAPPED[parts[0]].split(".") + parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("autopeft/**/*.py"), *(f for top in MAPPED for f in ROOT.glob(f"{top}/**/*.py"))]
    return {_module_name(f): f for f in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # `from a.b import c` is an edge to a.b.c when c is a module, else to a.b.
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF_TOP_MODULE.get(parts[1], 0) if len(parts) > 1 else 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_every_module():
    graph = _graph()
    assert {"autopeft.cli", "autopeft.runner.engine", "autopeft.backbones.unetr", "autopeft.search_spaces"} <= set(graph)
    assert "autopeft.search.space" in graph["autopeft.runner.engine"] or any(
        m.startswith("autopeft.search") for m in graph["autopeft.runner.engine"])


def test_no_import_circles_except_a_registry_loading_its_entries():
    graph = _graph()
    for source, target in REGISTRY_LOADS:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from REGISTRY_LOADS"
        graph[source] = graph[source] - {target}
    assert _cycles(graph) == []


@pytest.mark.parametrize("layer", sorted(set(LAYER_OF_TOP_MODULE.values()) | {0}))
def test_no_arrow_points_up_the_layers(layer):
    graph = _graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if _layer(m) == layer for d in deps
                    if _layer(d) > layer)
    assert upward == []


def test_the_checks_see_a_circle_and_an_upward_arrow():
    # The checks themselves can fail: a made-up graph with both faults.
    graph = {"autopeft.peft.a": {"autopeft.runner.b"}, "autopeft.runner.b": {"autopeft.peft.a"}}
    assert _cycles(graph) == [["autopeft.peft.a", "autopeft.runner.b"]]
    assert _layer("autopeft.runner.b") > _layer("autopeft.peft.a")
