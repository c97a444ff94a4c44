"""Tiling on Apache Beam: two DirectRunner worker processes against one, on the same synthetic slides.

Writes `python -m data_pipeline synthetic --slides 12 --size 2048` once (kept in --work-dir for reruns),
then tiles it in fresh subprocesses, each into a new DATA_DIR (wall times include the start-up of
Python, TensorFlow and Beam's worker processes):

  beam, 1 worker    --runner beam: DirectRunner, multi_processing, --direct_num_workers=1
  beam, 2 workers   the same with --direct_num_workers=2
  local, N workers  (--local) the default process pool, for comparison

The configurations alternate over --repeats rounds and each reports its median. Every DATA_DIR must
equal the first one file by file (the .lock, which holds the writer's pid, excepted), else the script
exits 1. Speed-up = wall time of beam 1 worker / beam 2 workers; it cannot exceed the number of idle
cores (the load average is printed with each run). CPU seconds count the whole process tree.

    .venv/bin/python benchmarks/beam_tiling.py                     # 12 slides of 2048 px, a few minutes
    .venv/bin/python benchmarks/beam_tiling.py --size 512 --local  # quick, with the local pool too
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_SPECIFIC = {".lock"}


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants: Beam's workers too
    return usage.ru_utime + usage.ru_stime


def run(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of `python -m data_pipeline COMMAND` in a fresh subprocess; exits on failure."""
    start, cpu = time.perf_counter(), cpu_seconds_of_children()
    completed = subprocess.run([sys.executable, "-m", "data_pipeline", *command], cwd=REPO,
                               capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command[:1])} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return seconds, cpu_seconds_of_children() - cpu


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in RUN_SPECIFIC}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=2048, help="synthetic slide side in pixels")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations")
    parser.add_argument("--local", action="store_true", help="also time the local pool with 1 and 2 workers")
    parser.add_argument("--work-dir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "gerne_beam_tiling_bench",
                        help="where the slides are written (reused when the arguments match) and tiled")
    args = parser.parse_args()

    slides = args.work_dir / f"slides_{args.slides}_{args.size}"
    manifest = slides / "manifest.csv"
    if not manifest.exists():
        seconds, _ = run(["synthetic", "--out", str(slides), "--slides", str(args.slides), "--size", str(args.size),
                       "--seed", "0"])
        print(f"wrote {args.slides} slides of {args.size} px to {slides} in {seconds:.0f} s")

    plural = {1: "1 worker", 2: "2 workers"}
    configurations = {f"beam, {plural[n]}": ["--runner", "beam", f"--beam-option=--direct_num_workers={n}"]
                      for n in (1, 2)}
    if args.local:
        configurations.update({f"local, {plural[n]}": ["--workers", str(n)] for n in (1, 2)})
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); "
          f"{args.slides} slides of {args.size} px, patch {args.patch_size}, {args.repeats} round(s)")

    times: dict[str, list[float]] = {name: [] for name in configurations}
    cpu: dict[str, list[float]] = {name: [] for name in configurations}
    reference, mismatches = None, []
    for round_ in range(args.repeats):
        for name, options in configurations.items():
            out = args.work_dir / "data"
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu_seconds = run(["tile", "--manifest", str(manifest), "--out", str(out),
                                     "--patch-size", str(args.patch_size), *options])
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
            print(f"  round {round_ + 1}, {name}: {wall:.1f} s wall, {cpu_seconds:.1f} s CPU, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            content = folder_bytes(out)
            if reference is None:
                reference = content
            elif content != reference:
                mismatches.append(name)
    shutil.rmtree(args.work_dir / "data", ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["beam, 1 worker"]
    print(f"\n| runner | wall s (median of {args.repeats}) | CPU s (median) | speed-up over beam, 1 worker |\n"
          "|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.1f} | {statistics.median(cpu[name]):.1f} | {baseline / seconds:.2f} |")
    if mismatches:
        print(f"DATA_DIR differs from the first run's for: {sorted(set(mismatches))}")
        return 1
    print("every DATA_DIR equals the first one file by file (.lock excepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
