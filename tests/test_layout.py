"""The folder tree is the architecture: layers, no import circles, no module shadowed by a name.

Every ``import`` in ``mlbench/`` counts, function-local ones included (they still tie the modules
together); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import mlbench

PACKAGE = Path(mlbench.__file__).resolve().parent

LAYERS = {
    0: ("mlbench.errors", "mlbench.paths", "mlbench.findings", "mlbench.budgets", "mlbench.isolation"),
    1: ("mlbench.metrics", "mlbench.models", "mlbench.image", "mlbench.samples", "mlbench.failures"),
    2: ("mlbench.pipeline", "mlbench.probes"),
    3: ("mlbench.checks",),
    4: ("mlbench.cases", "mlbench.studies"),
    5: ("mlbench.service", "mlbench.client", "mlbench.widgets", "mlbench.viz", "mlbench.cli", "mlbench.cli_models",
        "mlbench.train", "mlbench.ipython_ext", "mlbench.notebook", "mlbench.__main__"),
}
APART = {("mlbench.pipeline", "mlbench.probes"), ("mlbench.probes", "mlbench.pipeline")}
"""Rooms of one layer that must not import each other."""


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def room(name: str) -> tuple[int, str]:
    """The layer and the top-level room (``mlbench.x``) of a module."""
    for layer, rooms in LAYERS.items():
        for top in rooms:
            if name == top or name.startswith(top + "."):
                return layer, top
    raise AssertionError(f"{name} is in no layer: add its room to LAYERS (and to the README's code map)")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The mlbench modules ``name`` imports (``from pkg import submodule`` resolves to the submodule)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return {t for t in found if t in known and t != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        if name != "mlbench":
            room(name)


def test_no_import_climbs_a_layer_or_crosses_apart_rooms(graph):
    bad = []
    for name, targets in graph.items():
        if name == "mlbench":
            continue
        layer, top = room(name)
        for target in targets:
            if target == "mlbench":
                bad.append(f"{name} imports the top-level package (import the defining module instead)")
                continue
            other_layer, other_top = room(target)
            if other_layer > layer or (top, other_top) in APART:
                bad.append(f"{name} (L{layer}) imports {target} (L{other_layer})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle(graph):
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_is_shadowed_by_a_name():
    """``import mlbench.x.y as m`` gives the module: no function or class took its attribute name."""
    shadowed = []
    for info in pkgutil.walk_packages(mlbench.__path__, "mlbench."):
        module = importlib.import_module(info.name)
        parent_name, _, attribute = info.name.rpartition(".")
        if not isinstance(getattr(importlib.import_module(parent_name), attribute, module), ModuleType):
            shadowed.append(info.name)
        assert isinstance(module, ModuleType)
    assert not shadowed, f"modules hidden behind a name of the same spelling: {shadowed}"


def test_the_public_names_are_one_explicit_list():
    assert len(mlbench.__all__) == len(set(mlbench.__all__))
    assert all(hasattr(mlbench, name) for name in mlbench.__all__)
    design = {"list_models", "build_model", "load_model", "list_samples", "load_sample", "make_spheroids",
              "read_image", "check_image", "Pipeline", "segment", "trace_shapes", "record_memory", "estimate_memory",
              "max_input_size", "predict_tiled", "check_weights", "match_objects", "mask_to_polygons",
              "check_polygons", "overlay", "triage", "doctor", "save_case", "load_case", "report", "sweep",
              "sweep_executor", "widgets", "ServiceClient"}
    assert design <= set(mlbench.__all__)
