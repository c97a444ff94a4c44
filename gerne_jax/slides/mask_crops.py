"""The tumour mask under each patch of a DATA_DIR, and the whole tumour mask of a slide, at the tiling's scale.

A DATA_DIR stores a patch's label and tumour fraction, not its mask. The segmentation study
(experiments/segmentation.py) needs the pixels: `split_mask_crops` reads them back from the manifest's mask
files (or annotations) through the tiler's own reader (`scan.open_reader` with the settings of the DATA_DIR's
tiling report: level, downsample or microns per pixel, tumour ids, annotation classes), so crop `i` is
the `P x P` window of the chosen level whose top-left corner is patch `i`'s: stored `x, y` are level-0
pixels `rint(level coordinate * scale)` (docs/design.md §2), read back as `rint(x / scale)` and checked to
map to the stored value again. Crop and patch therefore align pixel for pixel, and
`crop.sum() == tumour_fraction * P^2` (the label: `crop.sum() >= min_tumour_pixels`).

`level_mask` reads a slide's whole tumour mask at that level, in bands of rows (bounded reads).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from gerne_jax.data import dataset
from gerne_jax.slides import tiling_report
from gerne_jax.slides.manifest import SlideSpec, read_manifest
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.scan import TilingConfig, open_reader

# Mask bytes one band read of `level_mask` may hold.
BAND_BYTES = 64 << 20


def data_tiling(data_dir: str | os.PathLike) -> TilingConfig:
    """The settings a DATA_DIR was tiled with, from its tiling report (a DatasetError where it has none)."""
    report = tiling_report.read(data_dir)
    if report is None:
        raise dataset.DatasetError(f"{data_dir} has no {tiling_report.FILE_NAME}: its tiling settings (the scale "
                                   "its masks are read at) are unknown; tile it with `gerne-jax tile`")
    return TilingConfig(**tiling_report.tiling_settings(report["config"]))


def level_coordinates(level0: np.ndarray, scale: float) -> np.ndarray:
    """Stored level-0 coordinates -> pixels of the chosen level; a DatasetError where one does not map back."""
    level0 = np.asarray(level0, np.int64)
    level = np.rint(level0 / scale).astype(np.int64)
    if not np.array_equal(np.rint(level * scale).astype(np.int64), level0):
        raise dataset.DatasetError(f"patch coordinates {level0[:3].tolist()}... are not on the grid of "
                                   f"{scale:g} level-0 pixels per pixel this tiling reads at")
    return level


def slide_specs(manifest: str | os.PathLike, slide_ids: Sequence[str]) -> dict[str, SlideSpec]:
    """The manifest's rows of these slides (a DatasetError names those it lacks)."""
    specs = {spec.slide_id: spec for spec in read_manifest(manifest)}
    missing = sorted(set(slide_ids) - set(specs))
    if missing:
        raise dataset.DatasetError(f"manifest {manifest} lacks the slide(s) {missing} of the DATA_DIR")
    return {slide_id: specs[slide_id] for slide_id in slide_ids}


def band_crops(reader: SlideReader, y: np.ndarray, x: np.ndarray, patch_size: int) -> np.ndarray:
    """`[n, P, P]` bool tumour crops with top-left corners (y, x) in level pixels, one read per distinct y."""
    crops = np.zeros((len(y), patch_size, patch_size), bool)
    for row in np.unique(y):
        chosen = np.flatnonzero(y == row)
        left, right = int(x[chosen].min()), int(x[chosen].max()) + patch_size
        band = reader.read_tumour(int(row), left, patch_size, right - left)
        for i in chosen:
            crops[i] = band[:, x[i] - left:x[i] - left + patch_size]
    return crops


def split_mask_crops(data_dir: str | os.PathLike, manifest: str | os.PathLike, split: str) -> np.ndarray:
    """`[M, P, P]` bool: the tumour mask under every patch of `split`, in index order (module docstring)."""
    table = dataset.read_patch_table(data_dir, split)
    config = data_tiling(data_dir)
    patch_size = config.patch_size
    crops = np.zeros((table["label"].size, patch_size, patch_size), bool)
    for slide_id, spec in slide_specs(manifest, list(dict.fromkeys(table["slide_id"]))).items():
        chosen = np.flatnonzero(table["slide_id"] == slide_id)
        with open_reader(spec, config) as reader:
            y = level_coordinates(table["y"][chosen], reader.scale)
            x = level_coordinates(table["x"][chosen], reader.scale)
            crops[chosen] = band_crops(reader, y, x, patch_size)
    return crops


def bands(height: int, width: int, band_bytes: int = BAND_BYTES) -> Iterator[tuple[int, int]]:
    """(first row, rows) of the bands that cover `height` rows of `width` bool pixels, each within `band_bytes`."""
    rows = max(1, band_bytes // max(width, 1))
    for top in range(0, height, rows):
        yield top, min(rows, height - top)


def level_mask(reader: SlideReader) -> np.ndarray:
    """The slide's whole tumour mask at the reader's level, `[H, W]` bool, read band by band."""
    height, width = reader.shape
    mask = np.zeros((height, width), bool)
    for top, rows in bands(height, width):
        mask[top:top + rows] = reader.read_tumour(top, 0, rows, width)
    return mask
