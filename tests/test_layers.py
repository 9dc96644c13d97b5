"""The layering contract: imports point down only, and there is no import cycle.

Layers, bottom up (docs/development.md, "Layers"):
  core     the algorithm: models, BAM, channel groups, importance, selection, surgery, BN,
           FLOPs, the loop (behind the Runner interface), checkpoints, storage
  runtime  where a model trains: one process (train), Ray Train workers (distributed), the
           factory that picks one (runners)
  search   Ray Tune + Optuna (ccpcsa/search/; its command line ccpcsa.search.run is in it)
  cli      the command lines (ccpcsa/__main__.py; search/run.py and search/report.py, the
           entry scripts `ray job submit` runs from the repository)

Every import counts, also one inside a function: a lazy import is still a dependency. The
graph is read from the source with `ast`, so the test needs nothing installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ccpcsa", "search")  # search/: the entry scripts only

RUNTIME = ("ccpcsa.distributed", "ccpcsa.runners", "ccpcsa.syncbn")
CLI = ("ccpcsa.__main__", "ccpcsa.export", "ccpcsa.data.cli", "ccpcsa.data.__main__", "search")
SEARCH = ("ccpcsa.search",)
CORE = (
    "ccpcsa.attention", "ccpcsa.bn", "ccpcsa.checkpoint", "ccpcsa.depth", "ccpcsa.flops",
    "ccpcsa.importance", "ccpcsa.layout", "ccpcsa.loop", "ccpcsa.models", "ccpcsa.probe",
    "ccpcsa.prunable", "ccpcsa.prune", "ccpcsa.pruner", "ccpcsa.runner", "ccpcsa.storage",
    "ccpcsa.weights",
)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> every name imported)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, raw = {}, {}
    for module, path in modules.items():
        raw[module] = _imports(path)
        edges[module] = {
            target for target in map(owner, raw[module])
            # a package's __init__ may gather its own submodules
            if target and target != module and not target.startswith(module + ".")
        }
    return edges, raw


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    return seen


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_neither_runtime_nor_search_nor_ray():
    edges, raw = _graph()
    for module in CORE:
        assert module in edges, f"{module} is listed as core but does not exist"
        reached = _closure(edges, module)
        upward = sorted(m for m in reached if _in(m, RUNTIME + CLI + SEARCH))
        assert not upward, f"{module} reaches {upward}"
        ray = sorted(m for m in reached if any(_in(n, ("ray",)) for n in raw[m]))
        assert not ray, f"{module} reaches Ray through {ray}"


def test_the_library_never_imports_the_search_or_a_command_line():
    edges, _ = _graph()
    for module, targets in edges.items():
        if module.startswith("ccpcsa") and not _in(module, CLI + SEARCH):
            upward = sorted(t for t in targets if _in(t, CLI + SEARCH))
            assert not upward, f"{module} imports {upward}"


def test_the_search_never_imports_a_command_line_or_its_entry_scripts():
    edges, _ = _graph()
    for module, targets in edges.items():
        if _in(module, SEARCH):
            upward = sorted(t for t in targets if _in(t, CLI))
            assert not upward, f"{module} imports {upward}"
