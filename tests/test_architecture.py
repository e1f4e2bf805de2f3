"""The house rules a reader relies on: no import cycles among headprof's modules, and a CLI that only
parses, calls headprof.api and prints."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "headprof"


def _imports() -> dict[str, set[str]]:
    """Module -> headprof modules it imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = f
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headprof"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("headprof")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_another_in_a_circle():
    graph = _imports()
    assert "headprof.api" in graph and graph["headprof.compression.compress"]  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cli_calls_only_the_api():
    allowed = {"headprof.api", "headprof.errors", "headprof.defaults", "headprof.quiet", "headprof"}
    for name, deps in _imports().items():
        if name.startswith("headprof.cli"):
            outside = {d for d in deps if not d.startswith("headprof.cli")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"
