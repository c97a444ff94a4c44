"""Tiling throughput beside plain TIFF decoding of the same file, and the tiler's peak memory.

Writes a large synthetic slide once (kept in --work-dir for reruns): a tiled uint8 RGB TIFF, bright
background with pink tissue and darker tumour (H&E-like), JPEG tiles, with reduced pyramid levels in
SubIFDs like a scanner's file, and a tiled tumour mask. Every tile is rendered by a generator from
coarse maps, so the writer's memory stays small. Then, in one run:

  decode   every level-0 tile through tifffile's zarr store, one row of tiles at a time
  tile     `python -m data_pipeline tile --patch-size 224` in a subprocess (its wall time includes
           Python / TensorFlow start-up; its own peak RSS is reported by `peak_rss.py`)
  workers  --many-slides N slides of --many-size pixels (written once like the big one) tiled with
           `--workers 1` and `--workers 2`, the speed-up of two workers over one (0 skips it)

MB/s count level-0 pixel bytes (H * W * 3). The tiler's peak RSS must stay under 1.5 GB.
`--profile` samples the big tiling run with py-spy (every thread, on PATH or `--py-spy`) and prints
where the time goes per thread and function; without py-spy it prints cProfile's main-thread table.

    .venv/bin/python benchmarks/tiling.py                 # 30000 x 30000 (a few minutes)
    .venv/bin/python benchmarks/tiling.py --size 4096 --many-slides 4 --many-size 2048   # quick
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
import zarr
from skimage.filters import gaussian

CELL = 64                 # level-0 pixels per cell of the coarse tissue / tumour maps
PYRAMID = (4, 16)         # downsamples of the reduced levels
RSS_LIMIT_MB = 1500
COLOURS = {"background": (236, 233, 240), "tissue": (196, 126, 176), "tumour": (150, 84, 162)}
REPO = pathlib.Path(__file__).resolve().parents[1]
PEAK_RSS = REPO / "benchmarks" / "peak_rss.py"  # runs a measured subprocess, reports its own peak memory


def coarse_maps(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random tissue (about 40% of the area) and tumour (inside tissue) maps at 1/CELL."""
    rng = np.random.default_rng(seed)
    cells = -(-size // CELL) + 1
    tissue_field = gaussian(rng.standard_normal((cells, cells)), sigma=4)
    tumour_field = gaussian(rng.standard_normal((cells, cells)), sigma=3)
    tissue = tissue_field > np.quantile(tissue_field, 0.6)
    return tissue, tissue & (tumour_field > np.quantile(tumour_field, 0.7))


def render_tile(maps: tuple[np.ndarray, np.ndarray], noise: np.ndarray, downsample: int, tile: int,
                ty: int, tx: int, mask: bool) -> np.ndarray:
    """Tile (ty, tx) of the level with `downsample`: RGB uint8 pixels, or the 0/1 tumour mask."""
    tissue, tumour = maps
    rows = np.minimum((ty * tile + np.arange(tile)) * downsample // CELL, tissue.shape[0] - 1)
    cols = np.minimum((tx * tile + np.arange(tile)) * downsample // CELL, tissue.shape[1] - 1)
    tumour_tile = tumour[np.ix_(rows, cols)]
    if mask:
        return tumour_tile.astype(np.uint8)
    tissue_tile = tissue[np.ix_(rows, cols)]
    image = np.where(tissue_tile[..., None], COLOURS["tissue"], COLOURS["background"])
    image = np.where(tumour_tile[..., None], COLOURS["tumour"], image)
    offset_y, offset_x = (ty * 37) % tile, (tx * 91) % tile
    return np.clip(image + noise[offset_y:offset_y + tile, offset_x:offset_x + tile], 0, 255).astype(np.uint8)


def write_slide(folder: pathlib.Path, size: int, tile: int, compression: str, seed: int = 0,
                slide_id: str = "bench") -> pathlib.Path:
    """Writes slide.tif (pyramid), tumour.tif and manifest.csv; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = coarse_maps(size, seed)
    noise = np.random.default_rng(seed + 1).integers(-10, 11, size=(2 * tile, 2 * tile, 3)).astype(np.int16)

    def tiles(downsample: int, mask: bool):
        length = -(-size // downsample)
        for ty in range(-(-length // tile)):
            for tx in range(-(-length // tile)):
                yield render_tile(maps, noise, downsample, tile, ty, tx, mask)

    image_path, mask_path = folder / "slide.tif", folder / "tumour.tif"
    partial = folder / ".slide.tif.partial"
    options = dict(tile=(tile, tile), compression=compression, photometric="rgb", dtype=np.uint8)
    with tifffile.TiffWriter(partial, bigtiff=True) as writer:
        writer.write(tiles(1, False), shape=(size, size, 3), subifds=len(PYRAMID), **options)
        for downsample in PYRAMID:
            length = -(-size // downsample)
            writer.write(tiles(downsample, False), shape=(length, length, 3), subfiletype=1, **options)
    os.replace(partial, image_path)
    partial = folder / ".tumour.tif.partial"
    tifffile.imwrite(partial, tiles(1, True), shape=(size, size), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", bigtiff=True)
    os.replace(partial, mask_path)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["slide_id", "image", "mask", "split"], [slide_id, "slide.tif", "tumour.tif", "train"]])
    return manifest


def many_slides(work_dir: pathlib.Path, count: int, size: int, tile: int, compression: str) -> pathlib.Path:
    """A manifest of `count` different slides (seeds 1..count), each written once by `write_slide`."""
    folder = work_dir / f"many_{count}_{size}_{tile}_{compression}"
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    rows = [["slide_id", "image", "mask", "split"]]
    for seed in range(1, count + 1):
        slide = folder / f"slide_{seed}"
        if not (slide / "manifest.csv").exists():
            write_slide(slide, size, tile, compression, seed=seed, slide_id=f"many{seed}")
        rows.append([f"many{seed}", f"{slide.name}/slide.tif", f"{slide.name}/tumour.tif", "train"])
    partial = folder / ".manifest.csv.partial"
    with open(partial, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(partial, manifest)
    return manifest


def decode_seconds(path: pathlib.Path) -> tuple[float, float]:
    """(wall, CPU) seconds to decode every tile of level 0, one row of tiles at a time (zarr store)."""
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    with tifffile.TiffFile(path) as tiff:
        array = zarr.open(tiff.series[0].aszarr(level=0), mode="r")
        tile_height = tiff.pages[0].tilelength
        checksum = 0
        for top in range(0, array.shape[0], tile_height):
            checksum += int(np.asarray(array[top:top + tile_height])[::97, ::97].sum())
    del checksum
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process or of its finished children (`who`)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measured(command: Sequence[str], python: Sequence[str] = (sys.executable,),
             **run_options: Any) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS in MB, the completed process) of a Python command line (`[SCRIPT, args]` or
    `["-m", MODULE, args]`) run by `python` through `peak_rss.py`, which reports the program's own peak."""
    with tempfile.TemporaryDirectory() as folder:
        report = pathlib.Path(folder) / "peak_rss"
        start = time.perf_counter()
        completed = subprocess.run([*python, str(PEAK_RSS), str(report), *command], capture_output=True,
                                   text=True, **run_options)
        seconds = time.perf_counter() - start
        peak = float(report.read_text()) if report.exists() else float("nan")
    return seconds, peak, completed


def tiling_run(manifest: pathlib.Path, out: pathlib.Path, patch_size: int, workers: int,
               python: Sequence[str] = (sys.executable,)) -> tuple[float, int, float]:
    """(wall seconds, patches, peak RSS in MB of the main process) of the tiling CLI in a fresh subprocess
    started by `python`."""
    shutil.rmtree(out, ignore_errors=True)
    command = ["-m", "data_pipeline", "tile", "--manifest", str(manifest), "--out", str(out),
               "--patch-size", str(patch_size), "--workers", str(workers)]
    seconds, peak, completed = measured(command, python, cwd=REPO)
    if completed.returncode != 0:
        sys.exit(f"tiling failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(out / "patches.csv") as f:
        patches = sum(1 for _ in f) - 1
    return seconds, patches, peak


def profiled_python(py_spy: str | None, output: pathlib.Path) -> list[str]:
    """The Python command that profiles the tiling run: under py-spy (every thread), else cProfile."""
    if py_spy:
        return [py_spy, "record", "--threads", "--rate", "100", "--format", "raw", "--output", str(output),
                "--", sys.executable]
    return [sys.executable, "-m", "cProfile", "-o", str(output)]


def print_profile(output: pathlib.Path, py_spy: bool, top: int = 25) -> None:
    """Top entries of the profile: py-spy samples per (thread, innermost project or library function)."""
    if not py_spy:
        import pstats
        pstats.Stats(str(output)).sort_stats("tottime").print_stats(top)
        return
    samples: collections.Counter = collections.Counter()
    for line in output.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(":")[-1].strip()
        if "_worker (concurrent/futures/thread.py" in frames[-1]:
            continue  # an idle pool thread waiting for work
        own = [f for f in frames[1:] if "data_pipeline/" in f or "gerne_jax/" in f]
        where = frames[-1] if not own or own[-1] is frames[-1] else f"{own[-1]} > {frames[-1]}"
        samples[(thread, where)] += int(count)
    total = sum(samples.values())
    print(f"profile: {total} samples of busy threads; top {top} (thread, innermost project frame > leaf)")
    for (thread, where), count in samples.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {thread:<24} {where}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30000, help="slide side in pixels")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--compression", default="jpeg", help="tifffile compression of the image tiles")
    parser.add_argument("--workers", type=int, default=1, help="tiling workers (one slide: 1 is enough)")
    parser.add_argument("--many-slides", type=int, default=8, help="slides of the workers measurement (0: skip)")
    parser.add_argument("--many-size", type=int, default=6144, help="side of each of those slides")
    parser.add_argument("--profile", action="store_true", help="profile the big tiling run (py-spy or cProfile)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable for --profile")
    parser.add_argument("--work-dir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "gerne_tiling_bench",
                        help="where the slide is written (reused when its size matches) and tiled")
    args = parser.parse_args()

    folder = args.work_dir / f"slide_{args.size}_{args.tile}_{args.compression}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        start = time.perf_counter()
        write_slide(folder, args.size, args.tile, args.compression)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    many = (many_slides(args.work_dir, args.many_slides, args.many_size, args.tile, args.compression)
            if args.many_slides else None)
    megabytes = args.size * args.size * 3 / 1e6
    decode, decode_cpu = decode_seconds(folder / "slide.tif")
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    tiling, patches, peak_mb = tiling_run(manifest, args.work_dir / "data", args.patch_size, args.workers)
    tiling_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if many is not None:  # one worker, then two, right after each other
        one, many_patches, _ = tiling_run(many, args.work_dir / "data_many", args.patch_size, 1)
        two, _, _ = tiling_run(many, args.work_dir / "data_many", args.patch_size, 2)

    file_mb = (folder / "slide.tif").stat().st_size / 1e6
    rows = [
        ("slide", f"{args.size} x {args.size} x 3 uint8, {args.tile} tiles, {args.compression}, "
                  f"{file_mb:.0f} MB on disk, {megabytes:.0f} MB of pixels"),
        ("decode level 0 (tifffile + zarr)", f"{decode:8.1f} s  {megabytes / decode:8.1f} MB/s"),
        (f"tile (patch {args.patch_size}, {args.workers} worker)", f"{tiling:8.1f} s  {megabytes / tiling:8.1f} MB/s"
                                                                  f"  {patches} patches"),
        ("tiling / decode throughput", f"{decode / tiling:8.2f}"),
        ("CPU seconds: decode, tiling (user + sys)", f"{decode_cpu:8.1f} s  {tiling_cpu:8.1f} s  "
                                                      f"(ratio {decode_cpu / tiling_cpu:.2f}; less sensitive to "
                                                      "other jobs than wall time)"),
        ("peak RSS of the tiling process", f"{peak_mb:8.0f} MB  (limit {RSS_LIMIT_MB} MB: "
                                           f"{'ok' if peak_mb < RSS_LIMIT_MB else 'EXCEEDED'})"),
    ]
    if many is not None:
        rows += [
            (f"{args.many_slides} slides of {args.many_size}^2, 1 worker", f"{one:8.1f} s  {many_patches} patches"),
            (f"{args.many_slides} slides of {args.many_size}^2, 2 workers", f"{two:8.1f} s"),
            ("2 workers / 1 worker throughput", f"{one / two:8.2f}  ({os.cpu_count()} CPUs)"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.profile:  # after the measured runs: the profiler slows the run it samples
        output = args.work_dir / ("tiling.pyspy" if args.py_spy else "tiling.cprofile")
        tiling_run(manifest, args.work_dir / "data", args.patch_size, args.workers,
                   profiled_python(args.py_spy, output))
        print_profile(output, bool(args.py_spy))
    return 0 if peak_mb < RSS_LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
