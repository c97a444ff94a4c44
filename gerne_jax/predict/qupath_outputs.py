"""Prediction outputs that QuPath opens over the slide: the probability map as a pyramidal OME-TIFF and
one detection per patch as GeoJSON.

- `write_probability_ome_tiff`: the map (`slide_outputs.ProbabilityMap`, one map pixel = `map_pixel` x
  `map_pixel` level-0 pixels, map pixel (0, 0) at level-0 (0, 0)) resampled onto a grid whose pixel is a
  WHOLE number k of level-0 pixels, so that it overlays the slide exactly: k = `map_pixel` when that is an
  integer (within 1e-6), else k = max(1, floor(`map_pixel`)). Written pixel (i, j) covers level-0
  rows [i k, (i + 1) k) and columns [j k, (j + 1) k) and holds the value of the map pixel containing its
  centre, map pixel (floor((i + 0.5) k / map_pixel), floor((j + 0.5) k / map_pixel)): nearest neighbour,
  probabilities are never interpolated. For an integer `map_pixel` this is the map itself. The grid has
  ceil(H0 / k) x ceil(W0 / k) pixels for a level-0 slide of H0 x W0 pixels (the map cropped or
  NaN-padded to it).
  The file: float32, one channel named "tumour_probability", NaN where no patch was classified ("no
  patch"); tiles of 256 x 256, deflate (zlib) compressed without predictor (the floating-point predictor
  is not read by every TIFF reader); reduced levels as SubIFDs, each half the previous one (rounded up)
  down to the first level whose long side is <= 1024 pixels, a reduced pixel being the mean of the
  non-NaN pixels of its 2 x 2 block (NaN if all four are NaN or outside the level). OME-XML records
  PhysicalSizeX/Y = k * base_mpp in µm when the slide's pixel size is known (nothing otherwise) and
  the TIFF resolution tags the same (in cm, or with unit NONE as 1 / (level-0 pixels per pixel) when
  the pixel size is unknown). The OME UUID is derived from the content, so a rerun writes the same bytes.
- `patch_detections`: a GeoJSON FeatureCollection of QuPath "detection" objects, one square per patch in
  level-0 pixel coordinates (rounded to 3 decimals) with the measurement "tumour_probability" and any
  extra columns. Measurements are written as QuPath >= 0.4 writes them, an object {name: value} (older
  QuPath reads only its list form); float32 values as the shortest decimal that reads back as the same
  float32. No "id" (QuPath assigns one on import), so the same input gives the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import tifffile

from gerne_jax.core import files

PROBABILITY_NAME = "tumour_probability"
TILE = 256
MAX_TOP_LEVEL_SIDE = 1024  # the pyramid stops at the first level whose long side is at most this
INTEGER_TOLERANCE = 1e-6


def level0_pixels_per_pixel(map_pixel: float) -> int:
    """k, the level-0 pixels per pixel of the written OME-TIFF (module docstring)."""
    if not (math.isfinite(map_pixel) and map_pixel > 0):
        raise ValueError(f"map_pixel must be a positive number of level-0 pixels, got {map_pixel!r}")
    nearest = round(map_pixel)
    if nearest >= 1 and abs(map_pixel - nearest) <= INTEGER_TOLERANCE:
        return int(nearest)
    return max(1, math.floor(map_pixel))


def _resample_to_grid(values: np.ndarray, map_pixel: float, slide_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The map on the grid of k x k level-0 pixels covering the slide, and k (module docstring)."""
    values = np.asarray(values, np.float32)
    if values.ndim != 2:
        raise ValueError(f"the probability map must be 2-D, got shape {values.shape}")
    k = level0_pixels_per_pixel(map_pixel)
    # An integer map_pixel divides by k itself, so the index is exactly i (no rounding at 1e-6).
    source_pixel = k if abs(map_pixel - k) <= INTEGER_TOLERANCE else map_pixel
    indices = [np.floor((np.arange(-(-side // k)) + 0.5) * k / source_pixel).astype(np.int64)
               for side in slide_shape]
    grid = np.full([index.size for index in indices], np.nan, np.float32)
    # The indices increase, so those inside the map are a prefix.
    rows, cols = (index[index < size] for index, size in zip(indices, values.shape))
    grid[:rows.size, :cols.size] = values[rows[:, None], cols[None, :]]
    return grid, k


def _halve(level: np.ndarray) -> np.ndarray:
    """The next pyramid level: each pixel the mean of the non-NaN pixels of its 2 x 2 block (NaN if none)."""
    shape = (-(-level.shape[0] // 2), -(-level.shape[1] // 2))
    total, count = np.zeros(shape, np.float64), np.zeros(shape, np.int8)
    for di in (0, 1):
        for dj in (0, 1):
            part = level[di::2, dj::2]
            present = ~np.isnan(part)
            total[:part.shape[0], :part.shape[1]] += np.where(present, part, 0.0)
            count[:part.shape[0], :part.shape[1]] += present
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _pyramid(level0: np.ndarray) -> list[np.ndarray]:
    """`level0`, then halved levels down to the first whose long side is <= MAX_TOP_LEVEL_SIDE."""
    levels = [level0]
    while max(levels[-1].shape) > MAX_TOP_LEVEL_SIDE:
        levels.append(_halve(levels[-1]))
    return levels


def write_probability_ome_tiff(path: str | os.PathLike, values: np.ndarray, map_pixel: float,
                               slide_shape: tuple[int, int], base_mpp: float | None,
                               description: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes the map as a pyramidal OME-TIFF overlaying the slide (module docstring); returns what it wrote:
    {"level0_pixels_per_pixel": k, "shape": [rows, columns], "levels": n, "mpp": k * base_mpp or None}.
    `description` (JSON-serialisable) goes with these into the OME Image Description as JSON."""
    map_pixel = float(map_pixel)  # numpy scalars in, JSON out
    base_mpp = None if base_mpp is None else float(base_mpp)
    if base_mpp is not None and not (math.isfinite(base_mpp) and base_mpp > 0):
        raise ValueError(f"base_mpp must be a positive number of microns per pixel or None, got {base_mpp!r}")
    level0, k = _resample_to_grid(values, map_pixel, slide_shape)
    levels = _pyramid(level0)
    mpp = None if base_mpp is None else k * base_mpp
    written = {"level0_pixels_per_pixel": k, "shape": list(level0.shape), "levels": len(levels), "mpp": mpp}
    text = json.dumps({**(description or {}), **written, "map_level0_pixels_per_pixel": map_pixel,
                       "values": "tumour probability, NaN where no patch was classified"})
    digest = hashlib.sha256(text.encode())
    digest.update(memoryview(np.ascontiguousarray(level0)).cast("B"))
    metadata: dict[str, Any] = {"axes": "YX", "Name": PROBABILITY_NAME, "Description": text,
                                "Channel": {"Name": [PROBABILITY_NAME]},
                                "UUID": str(uuid.uuid5(uuid.NAMESPACE_OID, digest.hexdigest()))}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    options = {"photometric": "minisblack", "tile": (TILE, TILE), "compression": "zlib"}
    with files.atomic_write(path) as temporary, tifffile.TiffWriter(temporary, ome=True) as tiff:
        for index, level in enumerate(levels):
            pixel = k * 2**index  # level-0 pixels per pixel of this level
            resolution = ({"resolution": (1e4 / (pixel * base_mpp),) * 2, "resolutionunit": "CENTIMETER"}
                          if base_mpp is not None else {"resolution": (1.0 / pixel,) * 2, "resolutionunit": "NONE"})
            if index == 0:
                tiff.write(level, subifds=len(levels) - 1, metadata=metadata, **resolution, **options)
            else:
                tiff.write(level, subfiletype=1, **resolution, **options)  # 1: a reduced-resolution image
    return written


def _measurement(name: str, column: np.ndarray, count: int) -> list[float | int]:
    column = np.asarray(column).reshape(-1)
    if column.size != count:
        raise ValueError(f"measurement {name!r} has {column.size} values for {count} patches")
    if column.dtype.kind in "biu":
        return column.astype(np.int64).tolist()
    if not np.all(np.isfinite(column)):
        raise ValueError(f"measurement {name!r} has {int(np.sum(~np.isfinite(column)))} values that are not "
                         "finite; QuPath's GeoJSON has no NaN or infinity")
    if column.dtype.itemsize < 8:  # the shortest decimal that reads back as the same float32
        return [float(str(value)) for value in column.astype(np.float32)]
    return column.astype(np.float64).tolist()


def patch_detections(x: np.ndarray, y: np.ndarray, size: float, probability: np.ndarray,
                     extra: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """GeoJSON FeatureCollection with one QuPath detection per patch: a square with top-left (x, y) and side
    `size` in level-0 pixels, measurement "tumour_probability" and one per `extra` column (module docstring)."""
    x0, y0 = (np.asarray(c, np.float64).reshape(-1) for c in (x, y))
    if x0.size != y0.size:
        raise ValueError(f"{x0.size} x coordinates for {y0.size} y coordinates")
    columns = {PROBABILITY_NAME: probability, **(extra or {})}
    measured = {name: _measurement(name, column, x0.size) for name, column in columns.items()}
    # Python's round rounds the decimal value correctly; np.round scales by 1000 first and can be off by 0.001.
    left, top, right, bottom = ([round(v, 3) for v in c.tolist()] for c in (x0, y0, x0 + size, y0 + size))
    features = []
    for index in range(x0.size):
        x_0, y_0, x_1, y_1 = left[index], top[index], right[index], bottom[index]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x_0, y_0], [x_1, y_0], [x_1, y_1], [x_0, y_1], [x_0, y_0]]]},
            "properties": {"objectType": "detection",
                           "measurements": {name: values[index] for name, values in measured.items()}},
        })
    return {"type": "FeatureCollection", "features": features}
