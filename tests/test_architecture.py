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
    assert "headprof.api" in graph and graph["headprof.compressing.compress"]  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_cli_calls_only_the_api():
    allowed = {"headprof.api", "headprof.errors", "headprof.defaults", "headprof.quiet", "headprof"}
    for name, deps in _imports().items():
        if name.startswith("headprof.cli"):
            outside = {d for d in deps if not d.startswith("headprof.cli")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def _blocks(text: str) -> dict[str, str]:
    """Each entry of an indented listing -> its text with everything indented under it (its description's
    continuation lines and the entries nested in it)."""
    lines = text.splitlines()
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        block = [line]
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt)
        out.setdefault(line.split()[0], "\n".join(block))
    return out


def _undocumented(text: str, modules: list[str]) -> list[str]:
    """Modules (paths under headprof/) that docs/architecture.md's inventory does not name: each must be an entry of
    the listing, or be named inside the entry of its folder."""
    listing = text[text.index("\nheadprof/\n"):]
    blocks = _blocks(listing[:listing.find("```") if "```" in listing else len(listing)])
    missing = []
    for rel in modules:
        folder, _, name = rel.rpartition("/")
        leaf = folder.rpartition("/")[2] + "/" if folder else None
        named = name in blocks if leaf is None else leaf in blocks and name in blocks[leaf]
        if not named:
            missing.append(rel)
    return missing


def test_every_module_is_in_the_architecture_inventory():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if f.name != "__init__.py")
    assert len(modules) > 40
    assert _undocumented(text, modules) == []


def test_the_inventory_check_finds_a_missing_module():
    text = ("Layout:\n```\nmodels.py  (a diagram)\n```\n```\nheadprof/\n  kv/\n    heads.py   the per-head kind\n"
            "  methods/   full.py,\n             snapkv.py\n  spare.py\n```\n")
    modules = ["kv/heads.py", "methods/full.py", "methods/snapkv.py", "methods/adakv.py", "kv/mystery.py", "spare.py",
               "models.py"]
    assert _undocumented(text, modules) == ["methods/adakv.py", "kv/mystery.py", "models.py"]


def test_no_subpackage_hides_a_public_name():
    """`headprof.compression(...)` is the API; a subpackage of that name would replace it once imported."""
    import importlib

    import headprof

    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] != "__main__":
            importlib.import_module(".".join(parts).removesuffix(".__init__"))
    shadowed = [name for name in headprof.__all__ if type(getattr(headprof, name)).__name__ == "module"]
    assert shadowed == []


def test_reading_a_profile_never_imports_transformers():
    """`show`, `compare`, `heatmap`, import and export read JSON: `headprof.api` loads its names on first use, and
    `third_party()` silences transformers through its environment variables when it is not imported yet."""
    import subprocess
    import sys

    smol = PACKAGE.parent / "profiles" / "smollm2-135m" / "retrieval.json"
    code = f"""
import sys
from headprof.quiet import third_party
from headprof import api
third_party()
api.summarise({str(smol)!r}, 5)
api.compare_profiles({str(smol)!r}, {str(smol)!r})
api.export_profile({str(smol)!r}, "headkv")
assert "transformers" not in sys.modules, "transformers"
assert sorted(api.__all__) == sorted(n for n in api.__all__ if getattr(api, n) is not None)
assert "transformers" in sys.modules  # every name resolved, the heavy ones too
from transformers.utils import logging
assert logging.get_verbosity() == logging.ERROR and not logging.is_progress_bar_enabled()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
