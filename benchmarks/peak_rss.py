"""Runs a Python program and writes its own peak resident memory (MB) to a file when it exits.

    python benchmarks/peak_rss.py REPORT -m data_pipeline tile ...
    python benchmarks/peak_rss.py REPORT predict.py --workdir ...

The benchmarks measure their subprocesses with it. `getrusage(RUSAGE_CHILDREN).ru_maxrss` cannot
tell: Linux carries a process's peak across `exec`, and a child that Python starts with `vfork` shares
the parent's memory until then, so the child's figure is at least the benchmark's own peak. The
kernel's VmHWM counts the memory map of the program itself, which `exec` created.
"""
from __future__ import annotations

import atexit
import os
import pathlib
import runpy
import sys


def peak_mb() -> float:
    """VmHWM of this process, in MB."""
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kilobytes / 1024


def read(report: pathlib.Path) -> float:
    """The peak a measured program wrote (MB)."""
    return float(pathlib.Path(report).read_text())


def main() -> None:
    report, target, *rest = sys.argv[1:]
    atexit.register(lambda: pathlib.Path(report).write_text(f"{peak_mb():.1f}"))
    # sys.path[0] as `python -m MODULE` and `python SCRIPT` set it, not this file's folder
    if target == "-m":
        module, *rest = rest
        sys.argv, sys.path[0] = [module, *rest], os.getcwd()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = [target, *rest], str(pathlib.Path(target).resolve().parent)
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
