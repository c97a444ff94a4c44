"""What whole-slide prediction writes per slide: the probability map and the files made from it.

- `ProbabilityMap`: the tumour probability on the patch grid, in cells of g = gcd(P, S) pixels of the
  predicted level, each cell the mean over the patches covering it (S < P: overlapping patches are
  averaged into a smooth map; S = P: one cell per patch); NaN where no patch was classified.
- `tumour_regions`: cells with probability >= threshold as GeoJSON polygons (with holes) in level-0
  pixel coordinates, a FeatureCollection of QuPath "annotation" objects classified "Tumor".
- `save_overlay`: PNG of the slide's thumbnail, the heatmap, the tissue outline and, where a mask
  exists, the true tumour outline.
- `write_patch_table`: one CSV row per classified patch.
Every file is written to a temporary name and renamed (`gerne_jax.core.files`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from skimage import measure

from gerne_jax.core import files

# Cells a map may hold (float64 sums + int32 counts while predicting): 1/4 GiB of working memory.
MAX_MAP_CELLS = 1 << 24
MAX_DISPLAY_SIDE = 1000
TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}  # QuPath's built-in tumour class


class ProbabilityMap:
    """Mean tumour probability of the patches covering each cell of g x g level pixels (module doc)."""

    def __init__(self, level_shape: tuple[int, int], patch_size: int, stride: int):
        self.cell = math.gcd(patch_size, stride)
        self.patch_cells = patch_size // self.cell
        self.shape = (-(-level_shape[0] // self.cell), -(-level_shape[1] // self.cell))
        if self.shape[0] * self.shape[1] > MAX_MAP_CELLS:
            raise ValueError(f"a probability map of {self.shape[0]} x {self.shape[1]} cells of {self.cell} pixels "
                             f"(gcd of patch size {patch_size} and stride {stride}) is too large; choose a "
                             "stride that shares a larger factor with the patch size")
        self._sum = np.zeros(self.shape, np.float64)
        self._count = np.zeros(self.shape, np.int32)

    def add(self, y: np.ndarray, x: np.ndarray, probability: np.ndarray) -> None:
        """Adds patches with top-left corners (y, x) in level pixels (multiples of the stride)."""
        rows, cols = np.asarray(y) // self.cell, np.asarray(x) // self.cell
        for i in range(self.patch_cells):
            for j in range(self.patch_cells):
                np.add.at(self._sum, (rows + i, cols + j), probability)
                np.add.at(self._count, (rows + i, cols + j), 1)

    def values(self) -> np.ndarray:
        """The map, float32, NaN where no patch lies."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._sum / np.maximum(self._count, 1), np.nan).astype(np.float32)


def tumour_regions(values: np.ndarray, threshold: float, scale: int,
                   properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the regions with probability >= `threshold`, level-0 pixels.

    Each 4-connected region becomes one Polygon: its outer boundary, then its holes. Boundaries run
    along the cell edges (corners cut at 45 degrees, as marching squares draws them); map cell (i, j)
    covers level-0 pixels [j * scale, (j + 1) * scale) x [i * scale, (i + 1) * scale).
    """
    above = np.nan_to_num(np.asarray(values, np.float64), nan=-1.0) >= threshold
    labels = measure.label(above, connectivity=1)
    features = []
    for region in measure.regionprops(labels):
        top, left, bottom, right = region.bbox
        component = np.pad(labels[top:bottom, left:right] == region.label, 1).astype(np.float32)
        rings = []
        for contour in measure.find_contours(component, 0.5, fully_connected="low"):
            # contour rows/cols are in padded-window cell indices with cell centres at integers
            xs = (contour[:, 1] - 1 + left + 0.5) * scale
            ys = (contour[:, 0] - 1 + top + 0.5) * scale
            ring = np.round(np.stack([xs, ys], axis=1), 3)
            rings.append((abs(_signed_area(ring)), ring))
        rings.sort(key=lambda item: -item[0])  # the outer boundary encloses the most area
        coordinates = [_closed(ring).tolist() for _, ring in rings]
        cells = int(region.area)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coordinates},
            "properties": {"objectType": "annotation", "name": f"tumour region {len(features) + 1}",
                           "classification": dict(TUMOUR_CLASS),
                           "measurements": {"cells": cells, "area_level0_pixels": cells * scale * scale,
                                            "mean_probability": float(np.mean(values[labels == region.label]))},
                           **(properties or {})},
        })
    return {"type": "FeatureCollection", "features": features}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _closed(ring: np.ndarray) -> np.ndarray:
    return ring if np.array_equal(ring[0], ring[-1]) else np.vstack([ring, ring[:1]])


def write_geojson(path: str | os.PathLike, collection: Mapping[str, Any]) -> None:
    files.write_text_atomic(path, json.dumps(collection))


PATCH_COLUMNS = ("slide_id", "x", "y", "tissue_ratio", "probability", "probability_non_tumour", "prediction")
LABEL_COLUMNS = ("label", "tumour_fraction")


def write_patch_table(path: str | os.PathLike, slide_id: str, table: Mapping[str, np.ndarray]) -> None:
    """One row per classified patch: x, y (level 0), tissue ratio, tumour probability, the class the
    model predicts (argmax), and, where a mask exists, the label and tumour fraction."""
    columns = PATCH_COLUMNS + (LABEL_COLUMNS if "label" in table else ())
    with files.atomic_write(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        values = [np.full(len(table["x"]), slide_id) if name == "slide_id" else table[name] for name in columns]
        for row in zip(*values):
            writer.writerow([v.item() if isinstance(v, np.generic) else v for v in row])


def read_patch_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The inverse of `write_patch_table` (typed columns)."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
        names = list(rows[0]) if rows else list(PATCH_COLUMNS)
    types = {"slide_id": str, "x": np.int64, "y": np.int64, "prediction": np.int32, "label": np.int32}
    return {name: np.array([row[name] for row in rows], dtype=str).astype(types.get(name, np.float32))
            for name in names}


def save_overlay(path: str | os.PathLike, thumbnail: np.ndarray, factor: int, tissue: np.ndarray,
                 tumour: np.ndarray | None, values: np.ndarray, cell: int, title: str) -> None:
    """The overlay PNG. `thumbnail` (h, w, C) and `tissue` / `tumour` (h, w) bool are at 1/`factor` of
    the predicted level; `values` is the probability map with cells of `cell` level pixels."""
    from gerne_jax.slides.qc import composite_rgb  # the QC thumbnails' channel colours

    step = max(1, math.ceil(max(thumbnail.shape[:2]) / MAX_DISPLAY_SIDE))
    thumbnail, tissue = thumbnail[::step, ::step], tissue[::step, ::step]
    tumour = None if tumour is None else tumour[::step, ::step]
    factor *= step
    height, width = thumbnail.shape[:2]
    extent = (0, width * factor, height * factor, 0)  # everything drawn in level pixels
    aspect = min(max(height / max(width, 1), 1 / 8), 8)
    figure, axis = files.new_figure(figsize=(8, 8 * aspect + 0.6), dpi=110)
    axis.imshow(composite_rgb(thumbnail), interpolation="nearest", extent=extent)
    heat = axis.imshow(np.ma.masked_invalid(values), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55,
                       interpolation="nearest", extent=(0, values.shape[1] * cell, values.shape[0] * cell, 0))
    for mask, colour, name in ((tissue, "#ffffff", "tissue"), (tumour, "#00e676", "true tumour")):
        if mask is not None and min(mask.shape) >= 2 and mask.any() and not mask.all():
            centres_y, centres_x = ((np.arange(n) + 0.5) * factor for n in mask.shape)
            axis.contour(centres_x, centres_y, mask.astype(np.float32), levels=[0.5], colors=[colour],
                         linewidths=0.8)
            axis.plot([], [], color=colour, label=name)
    axis.set_xlim(0, width * factor)
    axis.set_ylim(height * factor, 0)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower right", fontsize=7, framealpha=0.6)
    figure.colorbar(heat, ax=axis, fraction=0.03, pad=0.01, label="tumour probability")
    axis.set_title(title, fontsize=9)
    axis.set_axis_off()
    figure.tight_layout()
    files.save_figure(figure, path)


def write_rows_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV of dict rows (the union of their keys as columns, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with files.atomic_write(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_index(path: str | os.PathLike, title: str, rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str], overlays: Mapping[str, str], preamble: str = "") -> None:
    """index.md: a table of the slides, then every slide's overlay (relative paths)."""
    lines = [f"# {title}", "", preamble, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(name, "")) for name in columns) + " |")
    lines.append("")
    for slide_id, overlay in overlays.items():
        lines += [f"## {slide_id}", "", f"![{slide_id}]({pathlib.PurePosixPath(overlay)})", ""]
    files.write_text_atomic(path, "\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)
