"""The scripts of `benchmarks/` (not a package) as modules, for the tests that run their parts."""
from __future__ import annotations

import importlib.util
import pathlib
import types

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> types.ModuleType:
    """`benchmarks/<name>.py`, imported under the name `<name>_benchmark`."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
