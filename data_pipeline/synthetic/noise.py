"""Hashed lattice noise: smooth value noise and nucleus-like blobs, any window evaluated on its own.

Lattice values are a hash of (slide key, lattice point), so a field is a deterministic function of
position: tiles of a synthetic slide are rendered independently and join without seams.
"""
from __future__ import annotations

import numpy as np


def _hash_uniform(key: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 from (key, i, j) integer lattice coordinates (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(i, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(j, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(key)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def value_noise(key: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] at lattice coordinates (u, v) (arrays that broadcast together).

    Lattice values are hashed from (key, lattice point) and interpolated with a smoothstep, so the
    field is a deterministic function of position: any window can be evaluated on its own. A column
    `u` (h, 1) with a row `v` (1, w) takes a cheaper separable path (same values).
    """
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    iu, su = _lattice_cell(u)
    iv, sv = _lattice_cell(v)
    u0, v0 = int(iu.min()), int(iv.min())
    table = 2.0 * _hash_uniform(key, np.arange(u0, int(iu.max()) + 2)[:, None],
                                np.arange(v0, int(iv.max()) + 2)[None, :]) - 1.0
    a, b = iu - u0, iv - v0
    if u.ndim == v.ndim == 2 and u.shape[1] == 1 and v.shape[0] == 1:
        b, sv = b[0], sv[0]
        along_v = table[:, b] + sv * (table[:, b + 1] - table[:, b])  # (lattice rows, w)
        a = a[:, 0]
        return along_v[a] + su * (along_v[a + 1] - along_v[a])
    flat, stride = table.ravel(), table.shape[1]
    index = a * stride + b
    corner = flat[index]
    top = corner + sv * (flat[index + 1] - corner)
    corner = flat[index + stride]
    bottom = corner + sv * (flat[index + stride + 1] - corner)
    return top + su * (bottom - top)


def _lattice_cell(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer lattice cell and smoothstep weight of each coordinate."""
    floor = np.floor(u)
    t = u - floor
    return floor.astype(np.int64), t * t * (3.0 - 2.0 * t)


def nuclei(key: int, y: np.ndarray, x: np.ndarray, cell: float, density: float,
           radius: float) -> np.ndarray:
    """Nucleus-like blobs in [0, 1] on pixel rows `y` (h, 1) and columns `x` (1, w).

    One candidate nucleus per `cell`-sized grid cell at a hashed position, present with probability
    `density`, with a hashed radius r in [0.7, 1.3] * `radius` and the profile (1 - d^2 / (2r)^2)^2
    for d < 2r (<= cell). That support is compact, so the 3 x 3 cells around a pixel hold every blob
    that reaches it: the field is exact, seamless across windows. Blobs overlap by maximum.
    """
    cell_y = np.floor(y / cell).astype(np.int64)
    cell_x = np.floor(x / cell).astype(np.int64)
    y0, x0 = int(cell_y.min()) - 1, int(cell_x.min()) - 1
    rows = np.arange(y0, int(cell_y.max()) + 2)[:, None]
    cols = np.arange(x0, int(cell_x.max()) + 2)[None, :]
    # Four independent hashes per cell from disjoint lattice rows: jitter y, jitter x, presence, size.
    offset_y = (_hash_uniform(key, 4 * rows, cols) * cell).ravel()  # centre - cell corner
    offset_x = (_hash_uniform(key, 4 * rows + 1, cols) * cell).ravel()
    present = _hash_uniform(key, 4 * rows + 2, cols) < density
    support = np.minimum(2.0 * radius * (0.7 + 0.6 * _hash_uniform(key, 4 * rows + 3, cols)), cell)
    inv_support2 = np.where(present, 1.0 / support ** 2, np.inf).astype(np.float32).ravel()
    result = np.zeros(np.broadcast_shapes(y.shape, x.shape), np.float32)
    for dy in (-1, 0, 1):
        a = cell_y - y0 + dy
        from_row = (y - (a + y0) * cell).astype(np.float32)  # pixel - cell corner, (h, 1)
        for dx in (-1, 0, 1):
            b = cell_x - x0 + dx
            from_col = (x - (b + x0) * cell).astype(np.float32)
            index = a * cols.shape[1] + b
            d2 = (from_row - offset_y[index]) ** 2 + (from_col - offset_x[index]) ** 2
            falloff = np.maximum(1.0 - d2 * inv_support2[index], 0.0)
            np.maximum(result, falloff * falloff, out=result)
    return result
