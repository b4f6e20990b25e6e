"""The shape of the package: no import cycles, no oversized files, and the same packed codes as before.

The import check reads every module of the installed package (quantkit.*, quantkit.kernels.* from
kernels/src, quantkit.eval.* from eval/src) with ``ast`` and follows every import statement, those
inside functions included: a local import only defers a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the package folders of pyproject's [tool.setuptools] package-dir
PACKAGE_DIRS = {"quantkit": ROOT / "quantkit", "quantkit.kernels": ROOT / "kernels" / "src",
                "quantkit.eval": ROOT / "eval" / "src"}
MAX_LINES = 600


def package_modules() -> dict[str, Path]:
    """module name -> file, for every .py file of the package (subpackages from the other roots win)."""
    mods: dict[str, Path] = {}
    for pkg, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join((pkg, *rel))] = path
    return mods


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                while t and t not in mods:  # `import a.b.C` where C is not a module: a.b
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges.setdefault(t, node.lineno)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The distinct shortest cycles (paths a -> ... -> a) through the modules of every strongly connected
    component of more than one module; none when the import graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, iterative over the edges
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            u, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[u] = min(low[u], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[u])
            if low[u] == index[u]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == u:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles, seen = [], set()
    for comp in comps:  # the shortest cycle through each module of the component (breadth first)
        members = set(comp)
        for start in comp:
            prev: dict[str, str] = {start: ""}
            frontier, last = [start], None
            while last is None:
                nxt = []
                for u in frontier:
                    if start in graph[u]:
                        last = u
                        break
                    for w in sorted(graph[u]):
                        if w in members and w not in prev:
                            prev[w] = u
                            nxt.append(w)
                frontier = nxt
            path = [last]
            while path[-1] != start:
                path.append(prev[path[-1]])
            cycle = [*reversed(path), start]
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    hops = []
    for a, b in zip(cycle, cycle[1:]):
        hops.append(f"{a} ({mods[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}")
    return "\n    ".join(hops)


def test_no_import_cycles():
    mods = package_modules()
    assert {"quantkit.api", "quantkit.kernels", "quantkit.eval.report"} <= set(mods)
    graph = import_graph(mods)
    cycles = find_cycles(graph)
    msg = "\n".join(f"  cycle {i + 1}:\n    {describe(c, graph, mods)}" for i, c in enumerate(cycles))
    assert not cycles, f"{len(cycles)} import cycle(s) among the package's modules:\n{msg}"


def test_cycle_check_sees_local_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (tmp_path / "c.py").write_text("import os\n")
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py", "p.c": tmp_path / "c.py"}
    graph = import_graph(mods)
    assert graph["p.b"] == {"p.a": 2}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]


def test_no_file_over_600_lines():
    mods = package_modules()
    long = {str(p.relative_to(ROOT)): n for p in mods.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility): {long}"


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16-gptq", "any4-gptq", "w3-quip-normtweak"])
def test_packed_codes_unchanged(recipe, tmp_path):
    """Refactors keep the codes: the stored tensors, layer specs and report figures of rtn, gptq,
    any4-gptq and quip+norm-tweak on a tiny llama equal those recorded in tests/codes_reference/
    (exact names, dtypes, shapes and specs; codes, floats and figures within tolerances ~10x what
    another CPU's kernels move them by: tests/_codes.py says how they were measured). On a mismatch,
    the checkpoint is kept under tmp_path for bench/compare_codes.py."""
    import _codes

    assert recipe in _codes.RECIPES
    diff = _codes.compare(*_codes.recorded(recipe), *_codes.outputs(recipe, keep_dir=str(tmp_path)))
    assert not diff, (f"{recipe}: {len(diff)} differences from tests/codes_reference, e.g.\n  "
                      + "\n  ".join(diff[:8]) + f"\n(checkpoint kept in {os.path.join(tmp_path, recipe)}; "
                      "if the change is meant, re-record with `python tests/_codes.py --write` and say why)")


@pytest.mark.parametrize("recipe,override", [("w4a16-gptq", {"quantizer__damp": 0.02}),
                                             ("w3-quip-normtweak", {"transforms__0__seed": 1})])
def test_packed_codes_check_catches_algorithm_changes(recipe, override):
    """The tolerances are not so loose that a real change passes: GPTQ's damping moved from 0.01 to
    0.02, or the QuIP rotation's seed moved by one, changes stored tensors beyond them."""
    import _codes

    diff = _codes.compare(*_codes.recorded(recipe), *_codes.outputs(recipe, **override))
    assert any(d.startswith("tensor ") for d in diff), diff
