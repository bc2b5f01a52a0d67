"""The house rules of imports, read from the source with `ast` (nothing is imported):

    sdkernels <- model <- data (train.data) <- train, metrics <- bench <- sddit (the CLI)

A module may import its own layer and the layers below it, never one above; `train` and
`metrics` are siblings and import neither each other nor anything above; and no two
modules import each other, directly or around a circle. Imports inside functions count:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sdkernels", "model", "train", "metrics", "bench", "sddit")
RANK = {"sdkernels": 0, "model": 1, "data": 2, "train": 3, "metrics": 3, "bench": 4, "sddit": 5}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["train", "data"]:
        return "data"
    return parts[0]


def project_modules() -> dict[str, str]:
    """module name -> file path, for every .py file of the project's packages."""
    found = {}
    for package in PACKAGES:
        base = os.path.join(ROOT, package)
        for folder, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def imports_of(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """Project modules that `module` imports (absolute or relative, at any depth)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, m, modules) for m, p in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if module.startswith(target + "."):  # its own enclosing package
                continue
            here, there = layer(module), layer(target)
            up = RANK[there] > RANK[here]
            siblings = RANK[there] == RANK[here] and here != there
            if up or siblings:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    return sorted(wrong)


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    # An __init__ assembling its package from its submodules is not a circle, so edges from
    # a module into a package that encloses it are left out.
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return circles


def test_every_import_points_down_the_layers():
    wrong = layer_violations(import_graph())
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_circles():
    circles = find_circles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_checks_catch_what_they_guard_against():
    graph = {"model.dit": {"train.loop"}, "train.loop": {"metrics.fid"}, "metrics.fid": set(),
             "train.data.sources": {"model.dit"}, "bench.step": {"train.loop"}}
    assert layer_violations(graph) == [
        "model.dit (model) imports train.loop (train)",
        "train.loop (train) imports metrics.fid (metrics)"]
    circle = {"train.data.a": {"train.data.b"}, "train.data.b": {"train.data.a"},
              "train.data": {"train.data.a"}}
    assert find_circles(circle) == [["train.data.a", "train.data.b", "train.data.a"]]
