"""Writing synthetic slides: the image and mask TIFFs, tile by tile, and the manifest (`gerne-jax synthetic`).

Pixels are rendered `TILE` pixels a side and streamed to tifffile, so memory does not grow with the
slide; the per-pixel sensor noise of a tile comes from a generator seeded by (seed, slide, tile row,
tile column).
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile
from tqdm import tqdm

from data_pipeline.synthetic.layouts import LAYOUTS, SlideLayout, sample_layout
from data_pipeline.synthetic.rendering import render_geometry, render_image
from gerne_jax.core import files
from gerne_jax.core.errors import InputError

CHANNEL_NAMES = ("CARS", "TPEF", "SHG")
# Microns per pixel the slides are written at (TIFF resolution tags, in pixels per centimetre): nuclei of
# 2-2.6 pixels radius are then 8-10 µm across, and a 2048-pixel slide is a 4 mm piece of tissue.
MPP = 2.0
TILE = 256  # TIFF tile side and rendering unit (tifffile needs a multiple of 16)
MIN_SIZE = 256
SPLIT_FRACTIONS = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
DEFLATE_LEVEL = 1  # fast; the noisy image hardly compresses further at higher levels


def _tile_origins(height: int, width: int) -> list[tuple[int, int]]:
    return [(ty, tx) for ty in range(0, height, TILE) for tx in range(0, width, TILE)]


def _padded(tile: np.ndarray) -> np.ndarray:
    """Zero-pad an edge tile to TILE x TILE (tifffile's iterator needs full tiles)."""
    pad = [(0, TILE - tile.shape[0]), (0, TILE - tile.shape[1])] + [(0, 0)] * (tile.ndim - 2)
    return np.pad(tile, pad)


def _write_tiff(path: pathlib.Path, tiles: Iterator[np.ndarray | bytes], shape: tuple[int, ...],
                dtype: type, channel_names: Sequence[str] | None = None) -> None:
    """Tiled deflate TIFF at `MPP` µm/pixel from an iterator of tiles (arrays, or deflate-compressed
    bytes), written to a temp name then renamed."""
    metadata = {"axes": "YXS", "channel_names": list(channel_names)} if channel_names else {"axes": "YX"}
    with files.atomic_write(path) as partial:
        tifffile.imwrite(partial, data=tiles, shape=shape, dtype=dtype, tile=(TILE, TILE),
                         resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER",
                         photometric="minisblack", planarconfig="contig" if channel_names else None,
                         compression="zlib", compressionargs={"level": DEFLATE_LEVEL}, metadata=metadata)


def write_slide(layout: SlideLayout, seed: int, slide_index: int, image_path: pathlib.Path,
                mask_path: pathlib.Path, tissue_mask_path: pathlib.Path | None = None,
                progress: tqdm | None = None) -> None:
    """Render one slide tile by tile: image TIFF, tumour mask TIFF, optional true tissue mask TIFF.

    Geometry is computed once per tile; the mask tiles are kept deflate-compressed (a few hundred
    bytes each, mostly zeros) and written after the image.
    """
    mask_tiles: dict[str, list[bytes]] = {"tumour": [], "tissue": []}

    def image_tiles() -> Iterator[np.ndarray]:
        for ty, tx in _tile_origins(layout.height, layout.width):
            h, w = min(TILE, layout.height - ty), min(TILE, layout.width - tx)
            geometry = render_geometry(layout, ty, tx, h, w)
            for name in mask_tiles if tissue_mask_path is not None else ("tumour",):
                mask = _padded(getattr(geometry, name).astype(np.uint8))
                mask_tiles[name].append(zlib.compress(mask.tobytes(), DEFLATE_LEVEL))
            rng = np.random.default_rng([seed, slide_index, ty // TILE, tx // TILE])
            image = render_image(layout, geometry, ty, tx, rng)
            if progress is not None:
                progress.update(1)
            yield _padded(image)

    _write_tiff(image_path, image_tiles(), (layout.height, layout.width, len(CHANNEL_NAMES)),
                np.uint16, CHANNEL_NAMES)
    _write_tiff(mask_path, iter(mask_tiles["tumour"]), (layout.height, layout.width), np.uint8)
    if tissue_mask_path is not None:
        _write_tiff(tissue_mask_path, iter(mask_tiles["tissue"]), (layout.height, layout.width),
                    np.uint8)


def assign_splits(num_slides: int, seed: int) -> list[str]:
    """Split per slide, ~60/20/20, deterministic in (num_slides, seed); each split non-empty if N >= 3."""
    counts = {name: int(round(fraction * num_slides)) for name, fraction in SPLIT_FRACTIONS[1:]}
    if num_slides >= 3:
        counts = {name: max(1, count) for name, count in counts.items()}
    elif num_slides == 2:
        counts = {"validation": 1, "test": 0}
    else:
        counts = {"validation": 0, "test": 0}
    splits = (["validation"] * counts["validation"] + ["test"] * counts["test"]
              + ["train"] * (num_slides - sum(counts.values())))
    order = np.random.default_rng([seed, num_slides]).permutation(num_slides)
    return [splits[i] for i in order]


def generate(out_dir: str | os.PathLike, num_slides: int, size: int, seed: int = 0,
             write_tissue_masks: bool = False, show_progress: bool = True,
             layout: str = "classic") -> pathlib.Path:
    """Write `num_slides` synthetic slides and `out_dir/manifest.csv`; return the manifest path.

    `size` is the nominal side in pixels (each side is 92-100% of it). With
    `write_tissue_masks`, the true tissue geometry is written too (`tissue_mask` column), e.g. for
    tests; by default the tiler detects tissue from the image like on real data. `layout` is
    `classic` (the first generator, kept byte for byte) or `sections` (see the module docstring).
    """
    if num_slides < 1:
        raise InputError(f"--slides must be >= 1, got {num_slides}")
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if size < MIN_SIZE:
        raise InputError(f"--size must be >= {MIN_SIZE} pixels, got {size}")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    layouts = [sample_layout(seed, index, size, layout) for index in range(num_slides)]
    splits = assign_splits(num_slides, seed)
    total_tiles = sum(len(_tile_origins(lay.height, lay.width)) for lay in layouts)
    rows = []
    with tqdm(total=total_tiles, desc="synthetic tiles", unit="tile", disable=not show_progress) as bar:
        for index, (layout, split) in enumerate(zip(layouts, splits)):
            slide_id = f"slide_{index:03d}"
            slide_files = {"image": f"{slide_id}.tif", "mask": f"{slide_id}_tumour.tif"}
            if write_tissue_masks:
                slide_files["tissue_mask"] = f"{slide_id}_tissue.tif"
            write_slide(layout, seed, index, out / slide_files["image"], out / slide_files["mask"],
                        out / slide_files["tissue_mask"] if write_tissue_masks else None, progress=bar)
            rows.append({"slide_id": slide_id, **slide_files, "patient_id": f"patient_{index:03d}",
                         "split": split, "channel_names": ";".join(CHANNEL_NAMES)})
    manifest = out / "manifest.csv"
    with files.atomic_write(manifest) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = generate(args.out, args.slides, args.size, args.seed, args.write_tissue_masks,
                        layout=args.layout)
    print(f"wrote {args.slides} {args.layout} synthetic slides and {manifest}")
    return 0
