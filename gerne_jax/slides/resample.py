"""Area resampling of a pixel grid onto a grid whose pixels are `scale` source pixels a side.

Tiling at a physical scale (`--mpp`) reads the pyramid level nearest at or finer than the target and
resamples it by a factor s >= 1 that is rarely an integer; masks given at level 0 (or at an integer
fraction of it) are resampled onto the same grid, by any s > 0. Both use one definition:

    target pixel i covers the source interval [i * s, (i + 1) * s) on each axis;
    source pixel k has weight |[k, k + 1) & [i * s, (i + 1) * s)| / s (the weights of a pixel sum to 1);
    image value   = the area-weighted mean of the source pixels it covers (a box filter: antialiased),
                    rounded to the nearest integer for integer dtypes;
    mask value    = 1 when the area-weighted mean of the source mask (0 / 1) is at least 1/2.

The weights are applied separably, rows then columns, each as a sum over a fixed number of taps in a fixed
order, computed from the global pixel index: a target pixel's value depends on the source pixels and s
alone, never on the window it is computed in, so tiling in blocks and predicting in other blocks give the
same patches bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# Coverage is compared with 1/2 less this, so a pixel covered exactly half (0.4999999999 after rounding
# the weights) counts as covered.
COVERAGE_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Taps:
    """The source pixels and weights of a run of target pixels along one axis."""

    start: int          # first source pixel needed
    stop: int           # one past the last
    index: np.ndarray   # (n, T) source pixel of each tap, relative to `start`
    weight: np.ndarray  # (n, T) float64, zero for unused taps


def taps(start: int, length: int, scale: float, source_length: int) -> Taps:
    """The taps of target pixels [start, start + length) on a source axis of `source_length` pixels."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    targets = np.arange(start, start + length, dtype=np.float64)
    low, high = targets * scale, (targets + 1) * scale
    first = np.floor(low).astype(np.int64)
    count = math.ceil(scale) + 1
    sources = first[:, None] + np.arange(count)
    overlap = np.minimum(sources + 1, high[:, None]) - np.maximum(sources, low[:, None])
    weight = np.clip(overlap, 0.0, None) / scale
    sources = np.minimum(sources, source_length - 1)
    weight[sources != first[:, None] + np.arange(count)] = 0.0  # taps past the source's end
    if not length:
        return Taps(0, 0, np.zeros((0, count), np.int64), weight)
    lo, hi = int(sources.min()), int(sources.max()) + 1
    return Taps(lo, hi, sources - lo, weight)


def target_length(source_length: int, scale: float) -> int:
    """Target pixels whose source interval lies inside a source axis of `source_length` pixels."""
    return int(math.floor(source_length / scale + 1e-9))


def weighted(window: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    """The area means of the target pixels of `rows` x `cols` on `window`, the source pixels
    [rows.start:rows.stop, cols.start:cols.stop] as (h, w) or (h, w, C): float64 of the target shape."""
    window = np.asarray(window, np.float64)
    by_rows = np.zeros((rows.index.shape[0], *window.shape[1:]))
    extra = (None,) * (window.ndim - 1)
    for t in range(rows.index.shape[1]):
        by_rows += rows.weight[(slice(None), t, *extra)] * window[rows.index[:, t]]
    out = np.zeros((by_rows.shape[0], cols.index.shape[0], *window.shape[2:]))
    extra = (None,) * (window.ndim - 2)
    for t in range(cols.index.shape[1]):
        out += cols.weight[(None, slice(None), t, *extra)] * by_rows[:, cols.index[:, t]]
    return out


def to_dtype(means: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Area means back in the source dtype: rounded to the nearest integer for integer types."""
    dtype = np.dtype(dtype)
    return (means if dtype.kind == "f" else np.rint(means)).astype(dtype)


def covered(means: np.ndarray) -> np.ndarray:
    """Mask pixels from area means of a 0 / 1 mask: covered at least half."""
    return means >= 0.5 - COVERAGE_TOLERANCE
