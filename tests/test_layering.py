"""Layering: no import cycle between refnorm's modules (the engine's Tensor and primitives
excepted), and the library never imports the command line that sits on top of it."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: inside the engine, Tensor and its primitives may import each other (issue 9)
ENGINE = "refnorm.autograd"


def _modules():
    mods = {}
    for f in (ROOT / "refnorm").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def import_graph():
    """``{module: {modules it imports}}`` over every ``import`` statement of refnorm, at module
    level or inside a function (a lazy import is still a dependency). ``from pkg import name``
    is an edge to ``pkg.name`` when that is a module, else to ``pkg``; the implicit import of
    parent packages is not counted (every module would otherwise depend on ``refnorm``)."""
    mods = _modules()

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        package = m if is_pkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                           for a in node.names]
            for t in targets:
                r = resolve(t) if t.split(".")[0] == "refnorm" else None
                if r is not None and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_walk_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    graph = import_graph()
    assert "refnorm.oracle.trajectories" in graph["refnorm.oracle.goldens"]   # a lazy import
    assert "refnorm.norms._stats" in graph["refnorm.norms.layer_norm"]         # a relative one
    assert [c for c in cycles(graph) if c[0].startswith(ENGINE + ".")], \
        "the engine's known Tensor <-> primitives cycle should be seen"


def test_no_import_cycle_outside_the_engine():
    bad = [c for c in cycles(import_graph())
           if not all(m.startswith(ENGINE + ".") for m in c)]
    assert not bad, f"import cycles: {bad}"


def test_the_library_does_not_import_the_command_line():
    graph = import_graph()
    for m, deps in graph.items():
        if m not in ("refnorm.cli",):
            assert "refnorm.cli" not in deps, f"{m} imports refnorm.cli"
