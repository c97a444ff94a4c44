"""The image a slide reader reads: the channels of its files at one level, selected, reduced or resampled.

`LevelView` joins the channels of all image files at one pyramid level (their `level(i)` objects, any
backend: `image_files`), keeps the channels asked for, in the order asked for, and optionally reduces the
level by the area mean of d x d blocks. `ResampledView` resamples a view onto a grid of `scale` of its
pixels (`resample`: the area mean, for tiling at microns per pixel). Both read windows (y, x, h, w) of their
own grid and `scan` themselves in windows of bounded working memory (`scan_windows`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from gerne_jax.slides import resample

# Working memory (bytes) one window of a whole-level scan (thumbnail, validate) may take.
SCAN_BYTES = 64 << 20


class LevelSource(Protocol):
    """One level of one image file (`tiff_levels.TiffLevel`, `openslide_file.OpenSlideLevel`)."""

    shape: tuple[int, int]
    dtype: np.dtype
    num_channels: int
    chunk_shape: tuple[int, int]

    def read(self, rows: slice, cols: slice) -> np.ndarray: ...


class LevelView:
    """The channels of all image files at one pyramid level, optionally selected (`channels`, indices
    into the files' channels in order) and reduced by an area mean of `area_factor` blocks."""

    def __init__(self, sources: Sequence[LevelSource], area_factor: int, channels: Sequence[int] | None = None):
        self.area_factor = area_factor
        height, width = sources[0].shape
        self.shape = (height // area_factor, width // area_factor)
        self.dtype = sources[0].dtype
        total = sum(source.num_channels for source in sources)
        self._channels = None if channels is None or list(channels) == list(range(total)) else list(channels)
        if self._channels is None:
            self.sources = list(sources)
        else:  # only the files holding a chosen channel are read; indices into their concatenation
            first = np.cumsum([0] + [source.num_channels for source in sources])
            file_of = [int(np.searchsorted(first, c, side="right")) - 1 for c in self._channels]
            used = sorted(set(file_of))
            start = dict(zip(used, np.cumsum([0] + [sources[f].num_channels for f in used]).tolist()))
            self.sources = [sources[f] for f in used]
            self._channels = [start[f] + c - int(first[f]) for f, c in zip(file_of, self._channels)]
        self.num_channels = total if self._channels is None else len(self._channels)
        # Bytes a whole-level scan holds per pixel of this view (float64 working copy of the source).
        self.scan_bytes_per_pixel = 8 * sum(source.num_channels for source in self.sources) * area_factor ** 2
        self.chunk_shape = tuple(
            math.lcm(*(source.chunk_shape[axis] // math.gcd(source.chunk_shape[axis], area_factor)
                       for source in self.sources)) for axis in (0, 1))

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        factor = self.area_factor
        rows, cols = slice(y * factor, (y + h) * factor), slice(x * factor, (x + w) * factor)
        parts = [source.read(rows, cols) for source in self.sources]
        window = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        if self._channels is not None:
            window = window[..., self._channels]
        if factor == 1:
            return window
        blocks = window.reshape(h, factor, w, factor, self.num_channels).mean(
            axis=(1, 3), dtype=np.float64)
        return (blocks if self.dtype.kind == "f" else np.rint(blocks)).astype(self.dtype)

    def scan(self, multiple_of: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """(y, x, window) over the whole view in bounded memory (see `scan_windows`)."""
        return _scan(self, multiple_of)


class ResampledView:
    """A view resampled by area onto pixels of `scale` of its pixels (`resample`), in its dtype."""

    def __init__(self, view: LevelView, scale: float):
        self.view, self.scale = view, scale
        self.shape = tuple(resample.target_length(n, scale) for n in view.shape)
        self.dtype, self.num_channels = view.dtype, view.num_channels
        self.scan_bytes_per_pixel = view.scan_bytes_per_pixel * math.ceil(scale + 1) ** 2
        self.chunk_shape = tuple(max(1, int(c // scale)) for c in view.chunk_shape)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return resample.to_dtype(self.read_means(y, x, h, w), self.dtype)

    def read_means(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window's area means as float64, before rounding to the dtype."""
        rows = resample.taps(y, h, self.scale, self.view.shape[0])
        cols = resample.taps(x, w, self.scale, self.view.shape[1])
        window = self.view.read(rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)
        return resample.weighted(window, rows, cols)

    def scan(self, multiple_of: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        return _scan(self, multiple_of)


def _scan(view: LevelView | ResampledView, multiple_of: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for y, x, h, w in scan_windows(view.shape, view.chunk_shape, view.scan_bytes_per_pixel, multiple_of):
        yield y, x, view.read(y, x, h, w)


def scan_windows(shape: tuple[int, int], chunk_shape: tuple[int, int], bytes_per_pixel: int,
                 multiple_of: int = 1) -> Iterator[tuple[int, int, int, int]]:
    """(y, x, h, w) windows tiling `shape` row by row, each of about SCAN_BYTES working memory.

    Window sides are multiples of `multiple_of` and, when a chunk fits the budget, of the storage
    chunk, so no strip or tile is decoded twice; only windows at the bottom and right are smaller.
    """
    height, width = shape
    budget = max(1, SCAN_BYTES // max(1, bytes_per_pixel))  # pixels per window
    unit_h = math.lcm(multiple_of, max(1, chunk_shape[0]))
    unit_w = math.lcm(multiple_of, max(1, chunk_shape[1]))
    if unit_h * min(unit_w, width) > budget:  # chunks too big for the budget: give up alignment
        unit_h = multiple_of
        if unit_h * min(unit_w, width) > budget:
            unit_w = multiple_of
    window_w = max(unit_w, budget // unit_h // unit_w * unit_w)
    window_h = max(unit_h, budget // min(window_w, width) // unit_h * unit_h)
    for y in range(0, height, window_h):
        for x in range(0, width, window_w):
            yield y, x, min(window_h, height - y), min(window_w, width - x)
