"""Tiling throughput beside plain TIFF decoding of the same file, and the tiler's peak memory.

Writes a large synthetic slide once (kept in --work-dir for reruns): a tiled uint8 RGB TIFF, bright
background with pink tissue and darker tumour (H&E-like), JPEG tiles, with reduced pyramid levels in
SubIFDs like a scanner's file, and a tiled tumour mask. Every tile is rendered by a generator from
coarse maps, so the writer's memory stays small. Then, in one run:

  decode   every level-0 tile through tifffile's zarr store, one row of tiles at a time
  tile     `python -m data_pipeline tile --patch-size 224` in a subprocess (its wall time includes
           Python / TensorFlow start-up; its peak RSS is read from getrusage(RUSAGE_CHILDREN))

MB/s count level-0 pixel bytes (H * W * 3). The tiler's peak RSS must stay under 1.5 GB.

    .venv/bin/python benchmarks/tiling.py                 # 30000 x 30000 (a few minutes)
    .venv/bin/python benchmarks/tiling.py --size 4096     # quick
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile
import zarr
from skimage.filters import gaussian

CELL = 64                 # level-0 pixels per cell of the coarse tissue / tumour maps
PYRAMID = (4, 16)         # downsamples of the reduced levels
RSS_LIMIT_MB = 1500
COLOURS = {"background": (236, 233, 240), "tissue": (196, 126, 176), "tumour": (150, 84, 162)}
REPO = pathlib.Path(__file__).resolve().parents[1]


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


def write_slide(folder: pathlib.Path, size: int, tile: int, compression: str, seed: int = 0) -> pathlib.Path:
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
        writer.writerows([["slide_id", "image", "mask", "split"], ["bench", "slide.tif", "tumour.tif", "train"]])
    return manifest


def decode_seconds(path: pathlib.Path) -> float:
    """Seconds to decode every tile of level 0, one row of tiles at a time (zarr store)."""
    start = time.perf_counter()
    with tifffile.TiffFile(path) as tiff:
        array = zarr.open(tiff.series[0].aszarr(level=0), mode="r")
        tile_height = tiff.pages[0].tilelength
        checksum = 0
        for top in range(0, array.shape[0], tile_height):
            checksum += int(np.asarray(array[top:top + tile_height])[::97, ::97].sum())
    del checksum
    return time.perf_counter() - start


def tiling_run(manifest: pathlib.Path, out: pathlib.Path, patch_size: int, workers: int) -> tuple[float, int]:
    """(wall seconds, patches) of the tiling CLI in a fresh subprocess."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "data_pipeline", "tile", "--manifest", str(manifest), "--out", str(out),
               "--patch-size", str(patch_size), "--workers", str(workers)]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"tiling failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(out / "patches.csv") as f:
        patches = sum(1 for _ in f) - 1
    return seconds, patches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30000, help="slide side in pixels")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--compression", default="jpeg", help="tifffile compression of the image tiles")
    parser.add_argument("--workers", type=int, default=1, help="tiling workers (one slide: 1 is enough)")
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
    megabytes = args.size * args.size * 3 / 1e6
    decode = decode_seconds(folder / "slide.tif")
    tiling, patches = tiling_run(manifest, args.work_dir / "data", args.patch_size, args.workers)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux

    file_mb = (folder / "slide.tif").stat().st_size / 1e6
    rows = [
        ("slide", f"{args.size} x {args.size} x 3 uint8, {args.tile} tiles, {args.compression}, "
                  f"{file_mb:.0f} MB on disk, {megabytes:.0f} MB of pixels"),
        ("decode level 0 (tifffile + zarr)", f"{decode:8.1f} s  {megabytes / decode:8.1f} MB/s"),
        (f"tile (patch {args.patch_size}, {args.workers} worker)", f"{tiling:8.1f} s  {megabytes / tiling:8.1f} MB/s"
                                                                  f"  {patches} patches"),
        ("tiling / decode throughput", f"{decode / tiling:8.2f}"),
        ("peak RSS of the tiling process", f"{peak_mb:8.0f} MB  (limit {RSS_LIMIT_MB} MB: "
                                           f"{'ok' if peak_mb < RSS_LIMIT_MB else 'EXCEEDED'})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if peak_mb < RSS_LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
