"""The project's import graph, read from its source: every import, at module level or inside a function.

`python -m tests.import_graph [CHECKOUT]` prints the module count, the import arrows, the levels (the longest chain
of imports) and any cycle or upward import; `tests/project/test_layers.py` fails on the last two.

The layers of `gerne_jax` (docs/design.md section 6), lowest first: a module may import its own layer's
modules and those of lower layers, never a higher one. The tiling application `data_pipeline` stands
above all of them (it imports `gerne_jax`, never the reverse), and `configs` above that.
"""
from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Iterable, Mapping

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("gerne_jax", "data_pipeline", "configs")
LAYERS = ("gerne_jax.core", "gerne_jax.data", "gerne_jax.slides", "gerne_jax.models", "gerne_jax.runs",
          "gerne_jax.evaluation", "gerne_jax.train", "gerne_jax.methods", "gerne_jax.predict",
          "gerne_jax.commands", "gerne_jax", "data_pipeline", "configs")
Graph = dict[str, set[str]]


def module_files(root: pathlib.Path, packages: Iterable[str] = PACKAGES) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of `packages` under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: pathlib.Path) -> set[str]:
    """Every dotted name `module` imports anywhere in its file (relative imports resolved), including
    `importlib.import_module("literal")` calls."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return names


def import_graph(root: pathlib.Path = REPO, packages: Iterable[str] = PACKAGES) -> Graph:
    """Module -> the project modules it imports (an imported name counts as its nearest module)."""
    modules = module_files(root, packages)
    graph: Graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A package's empty __init__ is passed through on the way to its modules: not an arrow.
            if name and name != module and not (modules[name].name == "__init__.py"
                                                 and not modules[name].read_text().strip()):
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def layer_of(module: str, layers: Iterable[str] = LAYERS) -> int | None:
    """The index of the most specific layer that holds `module` (None: in no layer)."""
    matches = [(len(layer), i) for i, layer in enumerate(layers)
               if module == layer or module.startswith(layer + ".")]
    return max(matches)[1] if matches else None


def upward_imports(graph: Mapping[str, set[str]], layers: Iterable[str] = LAYERS) -> list[tuple[str, str]]:
    """Every arrow from a module to one of a higher layer."""
    layers = tuple(layers)
    return sorted((source, target) for source, targets in graph.items() for target in targets
                  if (layer_of(target, layers) or 0) > (layer_of(source, layers) or 0))


def levels(graph: Mapping[str, set[str]]) -> dict[str, int]:
    """Each module's level: 1 for a module that imports none, else 1 + the highest level it imports
    (an acyclic graph; a module on a cycle gets the level of its first visit)."""
    level: dict[str, int] = {}

    def visit(node: str, seen: frozenset[str]) -> int:
        if node not in level:
            level[node] = 1 + max((visit(t, seen | {node}) for t in graph.get(node, ()) if t not in seen),
                                  default=0)
        return level[node]

    for node in graph:
        visit(node, frozenset())
    return level


def summary(graph: Mapping[str, set[str]], package: str, root: pathlib.Path = REPO) -> str:
    """Modules (an empty `__init__.py` is none), arrows and levels of `package`'s part of the graph."""
    files = module_files(root, [package])
    inside = {m: {t for t in targets if t in files} for m, targets in graph.items()
              if m in files and files[m].read_text().strip()}
    return (f"{package}: {len(inside)} modules, {sum(map(len, inside.values()))} import arrows, "
            f"{max(levels(inside).values(), default=0)} levels")


def main() -> None:
    root = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    graph = import_graph(root)
    for package in PACKAGES:
        print(summary(graph, package, root))
    for component in cycles(graph):
        print("cycle:", " <-> ".join(component))
    for source, target in upward_imports(graph):
        print(f"upward import: {source} -> {target}")


if __name__ == "__main__":
    main()
