"""The package's import graph has no circle: every `from .x import` / `from ..x import` edge
between sdekit modules, at module level or inside a function (a lazy import that only hides a
circle counts too), read from the source with `ast`."""

import ast
from pathlib import Path

import sdekit

ROOT = Path(sdekit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import kernels` imports a submodule
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("sdekit"))
        graph[name] = {e for e in edges if e != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if v.startswith(u + "."):  # a package importing its own submodules is not a circle
                continue
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and v in graph:
                found = visit(v)
                if found:
                    return found
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert "sdekit.dynamics" in graph and "sdekit._process_base" in graph["sdekit.dynamics"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
