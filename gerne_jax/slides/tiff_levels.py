"""TIFF image data, window by window: opening a slide's TIFF files and their pyramid levels.

`open_tiff` opens a file and checks its series; `TiffLevel` is one pyramid level of its first series,
read window by window straight from its strips / tiles (`tiff_windows.PageWindows`; tifffile's zarr
store, behind a cache of decoded chunks, for rarer layouts), so only the strips / tiles a window
touches are decoded. `common_pyramid` finds the integer downsamples every file of a slide has, and
`TiffImageFile` is a TIFF file as the reader's image-file interface (`gerne_jax.slides.image_files`).
Every decoder or I/O error
surfaces as a `SlideError` naming the slide and file (`reading`).
"""
from __future__ import annotations

import collections
import contextlib
import math
import pathlib
import struct
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Iterator

import numpy as np
import tifffile
import zarr
from zarr.storage import WrapperStore

from gerne_jax.slides import physical
from gerne_jax.slides.manifest import SlideError
from gerne_jax.slides.tiff_windows import PageWindows

SPATIAL_AXES = ("Y", "X")
# Most bytes of decoded strips / tiles one TIFF level keeps for the next read (`_ChunkCache`).
CHUNK_CACHE_BYTES = 256 << 20
# Errors tifffile, imagecodecs and zarr raise on unreadable or corrupt data. Corrupt headers and tags
# also surface as arithmetic, struct, zlib and type errors deep inside tifffile (a zero dimension
# divides by zero while it detects the series), so those count as unreadable data too; they are
# caught only around the library calls that parse or decode a file (`reading`).
_READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, RuntimeError, KeyError, IndexError,
                EOFError, ArithmeticError, TypeError, MemoryError, NotImplementedError, struct.error,
                zlib.error)


class TiffLevel:
    """One pyramid level of a TIFF series, read lazily through tifffile's zarr store."""

    def __init__(self, tiff: tifffile.TiffFile, level: int, slide_id: str, file: pathlib.Path):
        self.file = file
        self._slide_id = slide_id
        self._level = level
        with reading(slide_id, file):  # a corrupt header can fail anywhere in tifffile's parsing
            self._parse(tiff, level)

    def _parse(self, tiff: tifffile.TiffFile, level: int) -> None:
        slide_id, file = self._slide_id, self.file
        series = tiff.series[0]
        level_series = series.levels[level]
        axes, shape = level_series.axes, level_series.shape
        if "Y" not in axes or "X" not in axes:
            raise SlideError(slide_id, file, f"no Y and X axes in series (axes {axes!r}, shape {shape})")
        extra = [a for a, n in zip(axes, shape) if a not in SPATIAL_AXES and n > 1]
        if len(extra) > 1:
            raise SlideError(slide_id, file, f"cannot tell the channel axis among {extra} "
                             f"(axes {axes!r}, shape {shape}); only one non-spatial axis may exceed 1")
        self.shape = (shape[axes.index("Y")], shape[axes.index("X")])
        self.dtype = np.dtype(level_series.dtype)
        self.num_channels = shape[axes.index(extra[0])] if extra else 1
        self._axes = axes
        self._channel_axis = extra[0] if extra else None
        self._check_not_truncated(tiff, level_series)
        # Storage chunk (strip or tile) in pixels: scans align to it so none is decoded twice.
        self._windows = PageWindows.of_level(level_series, self.num_channels)
        if self._windows is not None:
            self.chunk_shape = self._windows.segment_shape
            self._windows.set_cache_bytes(self._cache_bytes())
        else:  # tifffile's zarr store, opened only for the layouts `PageWindows` leaves out
            self._array = zarr.open(_ChunkCache(series.aszarr(level=level)), mode="r")
            self.chunk_shape = (self._array.chunks[axes.index("Y")], self._array.chunks[axes.index("X")])
            self._array.store.capacity = self._cache_bytes()

    def _cache_bytes(self) -> int:
        """Decoded chunks to keep: the next window of a band scan reads again the row of chunks the last one
        cut. Room for two rows across the level keeps it while the windows of a band, read in column
        chunks, decode the row below."""
        chunk_row = self.chunk_shape[0] * (self.shape[1] + self.chunk_shape[1])
        return min(2 * chunk_row * self.num_channels * self.dtype.itemsize, CHUNK_CACHE_BYTES)

    def _check_not_truncated(self, tiff: tifffile.TiffFile, level_series) -> None:
        file_size = tiff.filehandle.size
        for page in level_series.pages:
            if page is None:
                continue
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
            if ends.size and int(ends.max()) > file_size:
                raise SlideError(self._slide_id, self.file, f"truncated TIFF: image data ends at byte "
                                 f"{int(ends.max())} but the file has {file_size} bytes")

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels [rows, cols] (slices may have steps) as (h, w, C) in the source dtype."""
        with reading(self._slide_id, self.file):
            window = self._windows.read(rows, cols) if self._windows is not None else self._read_zarr(rows, cols)
        if self.dtype.kind == "f":
            self._check_finite(window, rows, cols)
        return window

    def _read_zarr(self, rows: slice, cols: slice) -> np.ndarray:
        """`read` through tifffile's zarr store, for the layouts `PageWindows` leaves out."""
        index, kept_axes = [], []
        for axis in self._axes:
            if axis == "Y":
                index.append(rows)
                kept_axes.append(axis)
            elif axis == "X":
                index.append(cols)
                kept_axes.append(axis)
            elif axis == self._channel_axis:
                index.append(slice(None))
                kept_axes.append(axis)
            else:
                index.append(0)
        window = np.asarray(self._array[tuple(index)])
        channel = kept_axes.index(self._channel_axis) if self._channel_axis else None
        return window[..., None] if channel is None else np.moveaxis(window, channel, -1)

    def _check_finite(self, window: np.ndarray, rows: slice, cols: slice) -> None:
        """NaN or Inf pixels would end up in the patches and make the channel statistics NaN, so
        every float read stops at the first one, naming its position (this level's pixels)."""
        finite = np.isfinite(window)
        if finite.all():
            return
        i, j, c = np.argwhere(~finite)[0].tolist()
        y = (rows.start or 0) + i * (rows.step or 1)
        x = (cols.start or 0) + j * (cols.step or 1)
        raise SlideError(self._slide_id, self.file, f"non-finite pixel value {window[i, j, c]} at y={y}, "
                         f"x={x}, channel {c} of pyramid level {self._level} (NaN and Inf are not allowed "
                         "in a slide)")


class _ChunkCache(WrapperStore):
    """A zarr store (tifffile's, of one TIFF level) that keeps the most recently decoded chunks.

    A window read decodes every strip or tile it touches, whole. Consecutive windows of a scan in
    patch bands share the row of chunks their common edge cuts through; keeping the last `capacity`
    bytes of decoded chunks (least recently used dropped first) decodes that row once. A cache too
    small for the shared row only loses hits, never correctness.
    """

    def __init__(self, store, capacity: int = 0):
        super().__init__(store)
        self.capacity = capacity
        self._chunks: collections.OrderedDict = collections.OrderedDict()  # key -> decoded Buffer
        self._size = 0

    def _with_store(self, store) -> _ChunkCache:
        return _ChunkCache(store, self.capacity)  # a derived store starts empty: fewer hits, same data

    async def get(self, key, prototype, byte_range=None):
        # zarr calls this on its event-loop thread only, so the dictionary needs no lock.
        if byte_range is None and key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        value = await self._store.get(key, prototype, byte_range)
        if byte_range is None and value is not None and len(value) <= self.capacity:
            self._chunks[key] = value
            self._size += len(value)
            while self._size > self.capacity:
                self._size -= len(self._chunks.popitem(last=False)[1])
        return value


@contextlib.contextmanager
def reading(slide_id: str, file: pathlib.Path) -> Iterator[None]:
    """Re-raises decoder / IO errors as a SlideError naming the slide and file."""
    try:
        yield
    except SlideError:
        raise
    except _READ_ERRORS as error:
        raise SlideError(slide_id, file, f"cannot read TIFF data: {type(error).__name__}: {error}"
                         ) from error


def open_tiff(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack) -> tifffile.TiffFile:
    with reading(slide_id, file):
        tiff = stack.enter_context(tifffile.TiffFile(file))
        if not tiff.series:
            raise SlideError(slide_id, file, "TIFF holds no image series")
        first = tiff.series[0]
        same = [s for s in tiff.series if (s.shape, s.dtype, s.axes) == (first.shape, first.dtype,
                                                                           first.axes)]
        if len(same) > 1:  # e.g. channels written as separate series; never guess which is which
            raise SlideError(slide_id, file, f"TIFF holds {len(same)} image series of shape "
                             f"{first.shape} (axes {first.axes!r}); expected one series with a "
                             "channel axis, or one file per channel")
        return tiff


def tiff_level_shapes(tiff: tifffile.TiffFile) -> list[tuple[int, int]]:
    shapes = []
    for level in tiff.series[0].levels:
        axes, shape = level.axes, level.shape
        shapes.append((shape[axes.index("Y")], shape[axes.index("X")]) if "Y" in axes and "X" in axes
                      else (0, 0))
    return shapes


def integer_downsample(base: tuple[int, int], reduced: tuple[int, int]) -> int | None:
    """The smallest integer d with `reduced` = `base` / d, rounded down or up per axis; else None."""
    low, high = 1, math.inf
    for full, small in zip(base, reduced):
        if small <= 0 or small > full:
            return None
        # floor(full / d) == small or ceil(full / d) == small  <=>  full/(small+1) < d < full/(small-1)
        low = max(low, full // (small + 1) + 1)
        if small > 1:
            high = min(high, -(-full // (small - 1)) - 1)
    return low if low <= high else None


def common_pyramid(level_shapes: list[list[tuple[int, int]]]) -> dict[int, list[int]]:
    """{downsample: level index in each file} for the integer downsamples every file has."""
    per_file = []
    for shapes in level_shapes:
        by_downsample: dict[int, int] = {}
        for index, shape in enumerate(shapes):
            factor = integer_downsample(shapes[0], shape)
            if factor is not None and factor not in by_downsample:
                by_downsample[factor] = index
        per_file.append(by_downsample)
    common = set.intersection(*(set(levels) for levels in per_file))
    return {d: [levels[d] for levels in per_file] for d in sorted(common)}


class TiffImageFile:
    """A slide's TIFF file as the reader sees any image file (`gerne_jax.slides.image_files`): its level
    shapes, its levels, its channel names (OME) and the pixel size it states (`physical`)."""

    level_downsamples = None  # levels are read as stored (`image_files.ImageFile`)

    def __init__(self, slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack):
        self.file, self._slide_id = file, slide_id
        self._tiff = open_tiff(slide_id, file, stack)
        with reading(slide_id, file):
            self.level_shapes = tiff_level_shapes(self._tiff)
            self.channel_names = _ome_channel_names(self._tiff.ome_metadata if self._tiff.is_ome else None)

    def level(self, index: int) -> TiffLevel:
        return TiffLevel(self._tiff, index, self._slide_id, self.file)

    def pixel_size(self) -> physical.PixelSize | str:
        with reading(self._slide_id, self.file):
            return physical.tiff_pixel_size(self._tiff)


def _ome_channel_names(ome_xml: str | None) -> tuple[str, ...]:
    """Channel names of the first OME image, or () if absent, incomplete or unparsable."""
    if not ome_xml:
        return ()
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return ()
    image = next((e for e in root if e.tag.endswith("Image")), None)
    if image is None:
        return ()
    channels = [e for e in image.iter() if e.tag.endswith("}Channel") or e.tag == "Channel"]
    return tuple(channel.get("Name", "") for channel in channels) if all(
        channel.get("Name") for channel in channels) else ()
