"""The shape of the code base, read from the source with ``ast`` (nothing is imported): no import cycle among the
modules of ``align`` (with ``align.rewards`` = ``rewards/`` and ``align.recipes`` = ``recipes/``), counting
imports inside functions too; no private name imported from another module; no module over 400 lines.

Plugins loaded by name (the ``testbed:`` prefix's ``align.testbed.plugin``, like an entry point) are not import
statements, so they are not edges: the library does not depend on them to import."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Package name -> folder (pyproject's [tool.setuptools.package-dir] plus align itself).
ROOTS = {"align": REPO / "align", "align.rewards": REPO / "rewards", "align.recipes": REPO / "recipes"}
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """Every module of the installed tree, by dotted name (a package by its ``__init__.py``)."""
    out: dict[str, Path] = {}
    for package, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def imports(name: str, files: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """``(module imported from, names imported, line)`` for every import statement of module ``name``, at any
    depth (functions, methods, ``if`` blocks), relative imports resolved."""
    tree = ast.parse(files[name].read_text(encoding="utf-8"), filename=str(files[name]))
    package = name if is_package(name, files) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports (``from a.b import c`` is an edge to ``a.b.c`` when that is a
    module, else to ``a.b``)."""
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name in files:
        for module, names, _ in imports(name, files):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(module)
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                    components.append(sorted(component))
    return components


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return component


def test_graph_sees_the_tree():
    graph = import_graph()
    assert {"align.modeling", "align.rewards.math", "align.recipes.sft", "align.testbed.build"} <= set(graph)
    assert "align.rewards.math" in graph["align.evaluation"]  # a module-level import
    assert "align.logps" in graph["align.evaluation"]  # a function-level one


def test_no_import_cycles():
    graph = import_graph()
    cycles = [one_cycle(graph, c) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    files = module_files()
    found = []
    for name in files:
        for module, names, line in imports(name, files):
            if not (module == "align" or module.startswith("align.")):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{files[name].relative_to(REPO)}:{line}: from {module} import {n}")
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_no_module_over_400_lines():
    long = []
    for path in module_files().values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(sorted(long))
