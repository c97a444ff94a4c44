"""Grid arithmetic of the tiler (pure numpy): patch origins, windowed pixel counts, read blocks.

Definitions at the tiled level (docs/design.md §2): patches have top-left corners (k*S, l*S) with
k*S + P <= H and l*S + P <= W (P patch size, S stride); the tissue thumbnail is at 1/f of the level.
"""
from __future__ import annotations

import math

import numpy as np

# Long side of the tissue-detection thumbnail when no tissue factor is given.
THUMBNAIL_SIDE = 2048


def grid_origins(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Patch starts k*S with k*S + P <= length (empty if the side is shorter than P)."""
    return np.arange(0, max(length - patch_size + 1, 0), stride, dtype=np.int64)


def window_counts(band: np.ndarray, starts: np.ndarray, patch_size: int) -> np.ndarray:
    """True pixels of `band` (h, w) bool in the column windows [s, s + P) for each start s."""
    column_prefix = np.concatenate([[0], np.cumsum(_column_counts(band))])
    return column_prefix[starts + patch_size] - column_prefix[starts]


def _column_counts(mask: np.ndarray) -> np.ndarray:
    """True pixels per column of `mask` (h, w) bool, as int64.

    Sums slices of 255 rows in uint8 (they cannot overflow) and adds those up: about ten times
    faster than summing the bools into int64 directly, which converts every element first.
    """
    rows = np.asarray(mask, bool).view(np.uint8)
    counts = np.zeros(mask.shape[1], np.int64)
    for start in range(0, mask.shape[0], 255):
        counts += np.add.reduce(rows[start:start + 255], axis=0, dtype=np.uint8)
    return counts


def lowres_window(lowres: np.ndarray, factor: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Window [y:y+h, x:x+w] of the full-resolution mask whose pixel (i, j) is lowres[i//f, j//f]
    (the last low-res row / column extends past the mask's end)."""
    r0, c0 = y // factor, x // factor
    r1, c1 = (y + h - 1) // factor + 1, (x + w - 1) // factor + 1
    block = lowres[r0:r1, c0:c1]
    block = np.pad(block, ((0, r1 - r0 - block.shape[0]), (0, c1 - c0 - block.shape[1])), mode="edge")
    full = np.repeat(np.repeat(block, factor, axis=1), factor, axis=0)
    return full[y - r0 * factor:y - r0 * factor + h, x - c0 * factor:x - c0 * factor + w]


def group_windows(starts: np.ndarray, patch_size: int, stride: int, max_extent: int) -> list[np.ndarray]:
    """Runs of consecutive window starts whose joint extent (last + P - first) is at most
    `max_extent` (at least one start per run)."""
    per_group = max(1, (max_extent - patch_size) // stride + 1)
    return [starts[i:i + per_group] for i in range(0, len(starts), per_group)]


def scan_plan(shape: tuple[int, int], patch_size: int, stride: int, bytes_per_pixel: int,
              budget: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The blocks a slide is read in: (patch-row starts, patch-column starts) per block, in
    row-major patch order. A block holds at most `budget` source bytes where a band of P rows
    allows: whole rows of several patch rows when the width fits (fewer re-decoded TIFF tiles
    where bands cut through them), else column chunks of one band."""
    P, S = patch_size, stride
    ys, xs = grid_origins(shape[0], P, S), grid_origins(shape[1], P, S)
    x_groups = group_windows(xs, P, S, budget // (P * bytes_per_pixel))
    if len(x_groups) == 1 and S <= P:  # with S > P, several rows per block would read the gaps
        span = int(x_groups[0][-1]) + P - int(x_groups[0][0])
        y_groups = group_windows(ys, P, S, budget // (span * bytes_per_pixel))
    else:
        y_groups = [ys[i:i + 1] for i in range(len(ys))]
    return [(y_group, x_group) for y_group in y_groups for x_group in x_groups]


def tissue_factor_for(shape: tuple[int, int], tissue_factor: int | None) -> int:
    """The thumbnail reduction f: `tissue_factor` if given, else the smallest power of 2 with
    max(H, W) / f <= THUMBNAIL_SIDE (a power of two, so a standard pyramid level can serve it)."""
    if tissue_factor is not None:
        return tissue_factor
    return 1 << max(0, math.ceil(math.log2(max(max(shape), 1) / THUMBNAIL_SIDE)))
