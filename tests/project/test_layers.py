"""The layering rule of docs/design.md section 6: no import cycle, no import from a higher layer."""
from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

from tests import import_graph
from tests.helpers import REPO


def test_the_project_has_no_import_cycle():
    assert import_graph.cycles(import_graph.import_graph()) == []


def test_no_module_imports_from_a_higher_layer():
    assert import_graph.upward_imports(import_graph.import_graph()) == []


def test_gerne_jax_imports_neither_the_tiling_application_nor_the_configs():
    graph = import_graph.import_graph()
    outside = {(source, target) for source, targets in graph.items() if source.startswith("gerne_jax")
               for target in targets if not target.startswith("gerne_jax")}
    assert outside == set()


def test_every_gerne_jax_module_stands_in_a_layer():
    graph = import_graph.import_graph()
    unplaced = [m for m in graph if m.startswith("gerne_jax.") and import_graph.layer_of(m) ==
                import_graph.LAYERS.index("gerne_jax") and m.count(".") > 1]
    assert unplaced == []


def _package(root: pathlib.Path, sources: dict[str, str]) -> None:
    for name, source in sources.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def test_the_checks_see_imports_inside_functions_relative_imports_and_import_module(tmp_path):
    """A cycle closed only by an import inside a function, and an upward import made relatively or
    through importlib, are found; the same package without them is clean."""
    _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "def f():\n    from pkg.low import b\n",
        "pkg/low/b.py": "from . import a\n",
        "pkg/high/__init__.py": "",
        "pkg/high/c.py": "import importlib\nimportlib.import_module('pkg.low.a')\n",
        "pkg/low/d.py": "from ..high import c\n",
    })
    layers = ("pkg.low", "pkg.high")
    graph = import_graph.import_graph(tmp_path, ["pkg"])
    assert graph["pkg.high.c"] == {"pkg.low.a"}
    assert import_graph.cycles(graph) == [["pkg.low.a", "pkg.low.b"]]
    assert import_graph.upward_imports(graph, layers) == [("pkg.low.d", "pkg.high.c")]

    (tmp_path / "pkg/low/a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg/low/d.py").write_text("from . import b\n")
    graph = import_graph.import_graph(tmp_path, ["pkg"])
    assert import_graph.cycles(graph) == []
    assert import_graph.upward_imports(graph, layers) == []
    assert import_graph.levels(graph) == {"pkg": 1, "pkg.low": 1, "pkg.high": 1, "pkg.low.a": 1,
                                          "pkg.low.b": 2, "pkg.low.d": 3, "pkg.high.c": 2}


def test_the_import_graph_command_prints_the_figures_of_every_package():
    """`python -m tests.import_graph` (docs/development.md): one summary line per package whose module count
    is the number of non-empty source files there, and no cycle or upward import."""
    completed = subprocess.run([sys.executable, "-m", "tests.import_graph"], cwd=REPO, capture_output=True,
                               text=True, check=True)
    lines = completed.stdout.splitlines()
    assert len(lines) == len(import_graph.PACKAGES)
    for package, line in zip(import_graph.PACKAGES, lines):
        modules = [p for p in (REPO / package).rglob("*.py") if p.read_text().strip()]
        assert line.startswith(f"{package}: {len(modules)} modules, "), line


def test_no_module_is_over_500_lines():
    folders = (*import_graph.PACKAGES, "experiments", "benchmarks")
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines())
             for folder in folders for path in (REPO / folder).rglob("*.py")}
    assert {path: size for path, size in sizes.items() if size > 500} == {}
