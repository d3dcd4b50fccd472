"""The package's layering: no import cycles (function-level imports included), and layers that only point down."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crossmodal_kd"

# lowest first; a module may import its own layer or lower ones
LAYERS = [
    {"__init__", "config", "hub", "io", "params", "registry", "stats"},
    {"data", "losses"},
    {"models"},
    {"clip", "targets"},
    {"methods"},
    {"engine"},
    {"bench", "cli", "export"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in the file (inside functions too), plus the
    packages Python imports on the way (``a.b.c`` runs ``a.b``'s ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == module:
                    continue
                own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and step != module and step not in own_packages:
                        graph[module].add(step)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name '{top}' is in no layer of tests/test_architecture.py")


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "crossmodal_kd.methods.context" in graph["crossmodal_kd.methods.kd"]
    assert "crossmodal_kd.models" in graph["crossmodal_kd.methods.context"]  # the package on the way to models.io
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_only_point_down():
    graph = import_graph()
    upward = sorted(
        f"{m} ({LAYERS[_layer(m)]}) -> {t}" for m, targets in graph.items() for t in targets if _layer(t) > _layer(m)
    )
    assert not upward, "imports that point up:\n" + "\n".join(upward)
