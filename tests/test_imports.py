"""The package's layering: the import graph of t2i_jax's parts has no cycle, and the models import
nothing of the layers built on them.

Imports are read from the source (ast), not executed, and every import counts: at module level,
inside functions (the lazy imports that hide a cycle from Python), under `if TYPE_CHECKING`.
A part is a first-level subpackage or module of t2i_jax: models, convert, schedulers, data, train,
eval, bench, pipeline, sample, parallel, tokenizer, files, ...
"""

from __future__ import annotations

import ast
import functools
import itertools
import pkgutil
from pathlib import Path

import t2i_jax

PACKAGE = "t2i_jax"
ROOT = Path(t2i_jax.__file__).resolve().parent
# What the models (the bottom layer) must never reach, directly or through another part.
ABOVE_MODELS = ("convert", "pipeline", "train", "sample", "bench", "eval")


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    out = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PACKAGE}."):
        rel = Path(*info.name.split(".")[1:])
        out[info.name] = ROOT / rel / "__init__.py" if info.ispkg else ROOT / rel.with_suffix(".py")
    return out


def _imported(name: str, path: Path) -> set[str]:
    """The t2i_jax modules (or names in them) that module `name` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from t2i_jax import train`
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@functools.cache  # read once for all the tests; nothing here mutates it
def part_graph() -> dict[str, dict[str, list[str]]]:
    """part -> {imported part: [the modules whose imports make that edge]}."""
    mods = _modules()
    parts = {p for p in map(_part, mods) if p}
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in parts}
    for name, path in mods.items():
        src = _part(name)
        if src is None:
            continue
        for target in _imported(name, path):
            dst = _part(target)
            if dst in parts and dst != src:
                graph[src].setdefault(dst, []).append(name)
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, sorted for a stable answer)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state:
                cycle = visit(v)
                if cycle:
                    return cycle
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            cycle = visit(u)
            if cycle:
                return cycle
    return None


def reachable(graph, start: str) -> set[str]:
    """Every part that `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for v in graph[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return seen


def _explain(graph, cycle) -> str:
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}: imported by {', '.join(sorted(set(graph[a][b])))}" for a, b in itertools.pairwise(cycle))


def test_the_walk_sees_the_package_and_lazy_imports():
    # The graph the other tests judge is the real one: every part, and an import
    # inside a function (the LDM trainer imports the pipeline only inside its eval).
    graph = part_graph()
    assert {"models", "convert", "schedulers", "data", "train", "eval", "bench", "pipeline", "sample",
            "parallel", "tokenizer", "files"} <= set(graph)
    assert "t2i_jax.train.ldm" in graph["train"]["pipeline"]


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b": ["x"]}, "b": {"c": ["y"]}, "c": {"a": ["z"]}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ["x"]}, "b": {}, "c": {"a": ["z"]}}) is None


def test_import_graph_has_no_cycle():
    graph = part_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"t2i_jax's import graph has a cycle: {_explain(graph, cycle)}"


def test_models_are_the_bottom_layer():
    graph = part_graph()
    above = sorted(reachable(graph, "models") & set(ABOVE_MODELS))
    assert not above, (f"t2i_jax.models imports {above} (directly: "
                       f"{ {p: sorted(set(m)) for p, m in graph['models'].items()} }); the models are the "
                       "bottom layer, so what needs both belongs in a part above them (e.g. convert/load.py)")
