"""The import rule (docs/architecture.md): no import cycles in either package, the layer contracts of `make lint`
(import-linter, pyproject.toml) kept, and the service's one seam into the build package (the RUNTIMES registry, by
name) pointing at importable modules."""

from __future__ import annotations

import grimp
import pytest

from samserve.backends.python_model import RUNTIMES


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's cycles as groups of modules (Tarjan's algorithm, iterative); a package counts as the
    module of its ``__init__``, so a package importing its own submodule is an edge like any other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


@pytest.mark.parametrize("package", ["samserve", "samserve_build"])
def test_no_import_cycles(package):
    graph = grimp.build_graph(package, exclude_type_checking_imports=False)
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.b", imported="p.c")
    assert strongly_connected(graph) == [["p.a", "p.b"]]


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_runtime_registry_names_modules_that_exist(name):
    """Each entry is "module:function" of a module on the path (imported by the integration tiers, where torch
    may load; here only found, so the unit tier stays free of torch)."""
    import importlib.util

    module, _, function = RUNTIMES[name].partition(":")
    assert function and importlib.util.find_spec(module) is not None, RUNTIMES[name]
