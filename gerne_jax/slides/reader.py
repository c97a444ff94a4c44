"""Lazy, region-wise reading of multichannel microscopy slides and their masks.

A slide is one multichannel TIFF, or one TIFF per channel (modality), plus a tumour mask and an
optional tissue mask (a `SlideSpec`, from `gerne_jax.slides.manifest.read_manifest`). `SlideReader` opens
the files with tifffile and reads windows straight from their strips / tiles (`tiff_windows`; tifffile's
zarr store for rarer layouts), so only the strips / tiles a window touches are decoded; no method
ever holds a whole level in memory.

Supported image files: stripped or tiled, uncompressed / deflate / LZW / JPEG / zstd / anything
tifffile+imagecodecs decode, classic or BigTIFF; samples interleaved (Y, X, C), planar (C, Y, X), or one
page per channel (shaped, ImageJ and OME hyperstacks, plain page-by-page stacks); pyramids as SubIFDs,
OME levels or reduced pages. The first series of a file is read (others, e.g. label or macro images,
are ignored, but several series of one shape are an error: they may be channels). Axes of length one
(T, Z, ...) are ignored; exactly one axis besides Y and X may hold the channels. Pixel types uint8,
uint16 and float32.

Resolution. `level=L` reads pyramid level L. `downsample=d` reads the pyramid level whose downsample is
d when every image file has one; otherwise it reads level 0 and reduces it by the **area mean** of d x d
blocks (rounded back to the source dtype; the level then has floor(H0/d) x floor(W0/d) pixels).

Masks (TIFF, read lazily, or PNG, read whole through Pillow, which refuses PNGs above its
decompression-bomb limit) hold {0, 1}, {0, 255}, or labels with `tumour_ids` naming the tumour labels.
A tumour mask has the chosen level's shape or level 0's shape; in the latter case pixel (i, j) of the
level is `mask[i * d, j * d]` (nearest, top-left). A tissue mask (nonzero = tissue) may also have a
shape an integer factor f smaller than the level's, then pixel (i, j) is `tissue[i // f, j // f]`.
"""
from __future__ import annotations

import collections
import contextlib
import math
import pathlib
import struct
import warnings
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile
import zarr
from PIL import Image
from zarr.storage import WrapperStore

from gerne_jax.data import dataset
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.tiff_windows import PageWindows

SPATIAL_AXES = ("Y", "X")
# Working memory (bytes) one window of a whole-level scan (thumbnail, validate) may take.
SCAN_BYTES = 64 << 20
# Most bytes of decoded strips / tiles one TIFF level keeps for the next read (`_ChunkCache`).
CHUNK_CACHE_BYTES = 256 << 20
# Errors tifffile, imagecodecs and zarr raise on unreadable or corrupt data. Corrupt headers and tags
# also surface as arithmetic, struct, zlib and type errors deep inside tifffile (a zero dimension
# divides by zero while it detects the series), so those count as unreadable data too; they are
# caught only around the library calls that parse or decode a file (`_reading`).
_READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, RuntimeError, KeyError, IndexError,
                EOFError, ArithmeticError, TypeError, MemoryError, NotImplementedError, struct.error,
                zlib.error)


# ---------------------------------------------------------------------------------------------------
# Array sources: one TIFF level or one in-memory PNG, read window by window as (h, w, C).
# ---------------------------------------------------------------------------------------------------
class _TiffLevel:
    """One pyramid level of a TIFF series, read lazily through tifffile's zarr store."""

    def __init__(self, tiff: tifffile.TiffFile, level: int, slide_id: str, file: pathlib.Path):
        self.file = file
        self._slide_id = slide_id
        self._level = level
        with _reading(slide_id, file):  # a corrupt header can fail anywhere in tifffile's parsing
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
        with _reading(self._slide_id, self.file):
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


class _MemoryArray:
    """A small (H, W) array read whole (PNG masks), with the same `read` as `_TiffLevel`."""

    def __init__(self, array: np.ndarray, file: pathlib.Path):
        self.file = file
        self.shape = array.shape[:2]
        self.dtype = array.dtype
        self.num_channels = 1
        self.chunk_shape = (1, 1)  # in memory: no decoding to align to
        self._array = array

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self._array[rows, cols][..., None]


@contextlib.contextmanager
def _reading(slide_id: str, file: pathlib.Path) -> Iterator[None]:
    """Re-raises decoder / IO errors as a SlideError naming the slide and file."""
    try:
        yield
    except SlideError:
        raise
    except _READ_ERRORS as error:
        raise SlideError(slide_id, file, f"cannot read TIFF data: {type(error).__name__}: {error}"
                         ) from error


def _open_tiff(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack) -> tifffile.TiffFile:
    with _reading(slide_id, file):
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


def _level_shapes(tiff: tifffile.TiffFile) -> list[tuple[int, int]]:
    shapes = []
    for level in tiff.series[0].levels:
        axes, shape = level.axes, level.shape
        shapes.append((shape[axes.index("Y")], shape[axes.index("X")]) if "Y" in axes and "X" in axes
                      else (0, 0))
    return shapes


def _integer_downsample(base: tuple[int, int], reduced: tuple[int, int]) -> int | None:
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


def _index_map(start: int, length: int, mode: str, factor: int,
               source_length: int) -> tuple[slice, np.ndarray | None]:
    """Source slice (plus a local re-index, if needed) giving target pixels [start, start+length)."""
    if mode == "same":
        return slice(start, start + length), None
    if mode == "subsample":  # target pixel i is source pixel i * factor
        return slice(start * factor, (start + length - 1) * factor + 1, factor), None
    # "upsample": target pixel i is source pixel i // factor (clipped for floor-rounded sources)
    source_index = np.minimum(np.arange(start, start + length) // factor, source_length - 1)
    if length == 0:
        return slice(0, 0), source_index
    first = int(source_index[0])
    return slice(first, int(source_index[-1]) + 1), source_index - first


class _MaskView:
    """A mask file mapped onto the chosen level's pixel grid ("same", "subsample" or "upsample")."""

    def __init__(self, source: _TiffLevel | _MemoryArray, mode: str, factor: int):
        self.source, self.mode, self.factor = source, mode, factor

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        rows, row_index = _index_map(y, h, self.mode, self.factor, self.source.shape[0])
        cols, col_index = _index_map(x, w, self.mode, self.factor, self.source.shape[1])
        window = self.source.read(rows, cols)[..., 0]
        if row_index is not None:
            window = window[row_index][:, col_index]
        return window


class _LevelView:
    """The channels of all image files at one pyramid level, optionally reduced by an area mean."""

    def __init__(self, sources: list[_TiffLevel], area_factor: int):
        self.sources, self.area_factor = sources, area_factor
        height, width = sources[0].shape
        self.shape = (height // area_factor, width // area_factor)
        self.dtype = sources[0].dtype
        self.num_channels = sum(source.num_channels for source in sources)
        # Bytes a whole-level scan holds per pixel of this view (float64 working copy of the source).
        self.scan_bytes_per_pixel = 8 * self.num_channels * area_factor ** 2
        self.chunk_shape = tuple(
            math.lcm(*(source.chunk_shape[axis] // math.gcd(source.chunk_shape[axis], area_factor)
                       for source in sources)) for axis in (0, 1))

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        factor = self.area_factor
        rows, cols = slice(y * factor, (y + h) * factor), slice(x * factor, (x + w) * factor)
        parts = [source.read(rows, cols) for source in self.sources]
        window = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        if factor == 1:
            return window
        blocks = window.reshape(h, factor, w, factor, self.num_channels).mean(
            axis=(1, 3), dtype=np.float64)
        return (blocks if self.dtype.kind == "f" else np.rint(blocks)).astype(self.dtype)

    def scan(self, multiple_of: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """(y, x, window) over the whole view in bounded memory (see `_scan_windows`)."""
        for y, x, h, w in _scan_windows(self.shape, self.chunk_shape, self.scan_bytes_per_pixel,
                                        multiple_of):
            yield y, x, self.read(y, x, h, w)


def _scan_windows(shape: tuple[int, int], chunk_shape: tuple[int, int], bytes_per_pixel: int,
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


def _read_png_mask(slide_id: str, file: pathlib.Path) -> _MemoryArray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                mode = image.mode
                array = np.asarray(image)
    except Image.DecompressionBombError as error:
        raise SlideError(slide_id, file, f"PNG mask too large to read whole ({error}); "
                         "give the mask as a tiled TIFF") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise SlideError(slide_id, file, f"cannot read PNG: {error}") from error
    if mode in ("RGB", "RGBA", "LA"):
        array = _grey_of_colour_mask(slide_id, file, mode, array)
    elif not (mode in ("1", "L", "P") or mode.startswith("I")):  # I, I;16, I;16B, ...
        raise SlideError(slide_id, file, f"mask must be single-channel, PNG mode is {mode}")
    return _MemoryArray(array, file)


def _grey_of_colour_mask(slide_id: str, file: pathlib.Path, mode: str, array: np.ndarray) -> np.ndarray:
    """The one channel of a grey mask that an editor saved in colour (R = G = B, alpha fully opaque).

    A mask whose colour channels differ, or whose alpha is not opaque everywhere, could mean several
    things (a colour-coded label map, a mask in the alpha channel); it is refused, naming what differs.
    """
    colour = array
    if mode in ("RGBA", "LA"):
        colour = array[..., :-1]
        transparent = int(np.count_nonzero(array[..., -1] != 255))
        if transparent:
            raise SlideError(slide_id, file, f"PNG mask in mode {mode} has {transparent} pixels that are not "
                             "fully opaque; save the mask as a single-channel (L) PNG or TIFF")
    grey = colour[..., 0]
    differing = int(np.count_nonzero((colour != grey[..., None]).any(axis=-1)))
    if differing:
        raise SlideError(slide_id, file, f"PNG mask in mode {mode} is not grey: {differing} pixels have "
                         "differing colour channels; save the mask as a single-channel (L) PNG or TIFF")
    return grey


def _ome_channel_names(ome_xml: str | None) -> tuple[str, ...]:
    """Channel names of the first OME image, or () if absent or unparsable."""
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


def _distinct_values(array: np.ndarray) -> set:
    """The values of an integer or bool array (Python ints). Binary masks, {0, 1} or {0, 255},
    take two or three vectorised passes; anything else is counted value by value."""
    if array.size == 0:
        return set()
    low, high = int(array.min()), int(array.max())
    if high - low <= 1:  # no integer lies between them, and both occur
        return {low, high}
    if (low, high) == (0, 255) and np.count_nonzero(array) == np.count_nonzero(array == 255):
        return {0, 255}
    if array.dtype == bool or array.dtype in (np.uint8, np.uint16):
        counts = np.bincount(array.ravel().astype(np.int64, copy=False))
        return set(np.flatnonzero(counts).tolist())
    return set(np.unique(array).tolist())


def _format_values(values: Sequence, limit: int = 20) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} distinct)"


def _block_mean(window: np.ndarray, factor: int) -> np.ndarray:
    """Means of factor x factor blocks of (h, w, C); partial blocks at the edges average what exists."""
    if factor == 1:
        return window
    row_starts = np.arange(0, window.shape[0], factor)
    col_starts = np.arange(0, window.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(window, row_starts, axis=0), col_starts, axis=1)
    row_counts = np.diff(np.append(row_starts, window.shape[0]))
    col_counts = np.diff(np.append(col_starts, window.shape[1]))
    return sums / np.outer(row_counts, col_counts)[..., None]


def _fit(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crops or edge-pads the first two axes of `array` to `shape`."""
    array = array[: shape[0], : shape[1]]
    pad = [(0, shape[0] - array.shape[0]), (0, shape[1] - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="edge") if any(after for _, after in pad) else array


# ---------------------------------------------------------------------------------------------------
# SlideReader
# ---------------------------------------------------------------------------------------------------
def placeholder_channel_names(num_channels: int) -> tuple[str, ...]:
    """The names of channels that the manifest and the file leave unnamed: `channel_0`, `channel_1`, ..."""
    return tuple(f"channel_{c}" for c in range(num_channels))


class SlideReader:
    """Lazy reader of one slide at one resolution; use as a context manager.

        with SlideReader(spec, downsample=4) as slide:
            slide.validate()
            patch = slide.read_region(y, x, 256, 256)       # (256, 256, C), source dtype
            tumour = slide.read_tumour(y, x, 256, 256)      # (256, 256) bool

    Opening (`__enter__`) checks headers: readable, not truncated, supported dtype, channel files of
    one shape and dtype, mask shapes. `validate()` adds checks that need the pixels.
    """

    def __init__(self, spec: SlideSpec, level: int = 0, downsample: int | None = None,
                 tumour_ids: Sequence[int] | None = None):
        if not spec.image_files:
            raise ValueError(f"slide {spec.slide_id!r}: no image files")
        if level < 0:
            raise ValueError(f"slide {spec.slide_id!r}: level must be >= 0, got {level}")
        if downsample is not None and downsample < 1:
            raise ValueError(f"slide {spec.slide_id!r}: downsample must be >= 1, got {downsample}")
        if downsample is not None and level != 0:
            raise ValueError(f"slide {spec.slide_id!r}: give level or downsample, not both "
                             f"(level={level}, downsample={downsample})")
        self.spec = spec
        self.slide_id = spec.slide_id
        self._level = level
        self._downsample = downsample
        self._tumour_ids = None if tumour_ids is None else np.asarray(sorted(set(tumour_ids)))
        self._stack: contextlib.ExitStack | None = None
        self._mask_checked = False  # set by `validate`: `read_tumour` need not check values again

    # -- opening ------------------------------------------------------------------------------------
    def __enter__(self) -> SlideReader:
        self._stack = contextlib.ExitStack()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Closes the files (also done by leaving the `with` block)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _open(self) -> None:
        files = self.spec.image_files
        self._tiffs = [_open_tiff(self.slide_id, file, self._stack) for file in files]
        level_shapes = []
        for file, tiff in zip(files, self._tiffs):
            with _reading(self.slide_id, file):
                level_shapes.append(_level_shapes(tiff))
        self._base_shape = level_shapes[0][0]
        for file, tiff, shapes in zip(files, self._tiffs, level_shapes):
            if 0 in shapes[0]:
                raise SlideError(self.slide_id, file, f"empty slide: zero size (series shape "
                                 f"{tiff.series[0].shape}, axes {tiff.series[0].axes!r})")
        self._pyramid = _common_pyramid(level_shapes)  # {downsample: level index per file}
        if self._downsample is None:
            for file, shapes in zip(files, level_shapes):
                if self._level >= len(shapes):
                    raise SlideError(self.slide_id, file, f"level {self._level} requested but the "
                                     f"file has {len(shapes)} level(s)")
            matches = [d for d, levels in self._pyramid.items() if levels == [self._level] * len(files)]
            if not matches:
                raise SlideError(self.slide_id, files[0], f"level {self._level} is not an integer "
                                 f"downsample of level 0 in every file (level shapes {level_shapes})")
            self.level_downsample, area_factor = matches[0], 1
        elif self._downsample in self._pyramid:
            self.level_downsample, area_factor = self._downsample, 1
        else:  # no pyramid level with this downsample: area mean of level 0
            self.level_downsample, area_factor = self._downsample, self._downsample
        self._image = _LevelView(self._level_sources(self.level_downsample // area_factor), area_factor)
        self.shape = self._image.shape
        self.dtype = self._image.dtype
        self.num_channels = self._image.num_channels
        self.chunk_shape = self._image.chunk_shape  # the storage chunk in level pixels (decoded whole)
        self.channel_names = self._resolve_channel_names()
        self._tumour = None if self.spec.mask_file is None else self._open_mask(self.spec.mask_file)
        self._tissue = None if self.spec.tissue_mask_file is None else self._open_mask(self.spec.tissue_mask_file)

    def _level_sources(self, downsample: int) -> list[_TiffLevel]:
        sources = [_TiffLevel(tiff, level, self.slide_id, file) for tiff, level, file
                   in zip(self._tiffs, self._pyramid[downsample], self.spec.image_files)]
        for source in sources:
            if source.dtype not in dataset.IMAGE_DTYPES:
                raise SlideError(self.slide_id, source.file, f"unsupported dtype {source.dtype} "
                                 f"(supported: {', '.join(str(d) for d in dataset.IMAGE_DTYPES)})")
        first = sources[0]
        for source in sources[1:]:
            if source.shape != first.shape or source.dtype != first.dtype:
                raise SlideError(self.slide_id, source.file, f"channel files differ: {first.file.name} "
                                 f"is {first.shape} {first.dtype}, {source.file.name} is "
                                 f"{source.shape} {source.dtype}")
        return sources

    def _resolve_channel_names(self) -> tuple[str, ...]:
        """The manifest's names, else OME channel names, else channel_0, channel_1, ...

        File names are not used: they often carry the slide id, and names must agree across slides.
        """
        if self.spec.channel_names is not None:
            names = tuple(self.spec.channel_names)
            if len(names) != self.num_channels:
                raise SlideError(self.slide_id, self.spec.image_files[0], f"{len(names)} channel names "
                                 f"{list(names)} for {self.num_channels} channels")
            return names
        if len(self._tiffs) == 1 and self._tiffs[0].is_ome:
            names = _ome_channel_names(self._tiffs[0].ome_metadata)
            if len(names) == self.num_channels and len(set(names)) == len(names):
                return names
        return placeholder_channel_names(self.num_channels)

    def _open_mask(self, file: pathlib.Path) -> _MaskView:
        """A mask at the level's shape, level 0's, or an integer fraction of the level's (annotations are
        often rasterised at a reduced scale; each mask pixel then covers factor x factor level pixels)."""
        if file.suffix.lower() == ".png":
            source = _read_png_mask(self.slide_id, file)
        else:
            source = _TiffLevel(_open_tiff(self.slide_id, file, self._stack), 0, self.slide_id, file)
            if source.num_channels != 1:
                raise SlideError(self.slide_id, file, f"mask must have one channel, found "
                                 f"{source.num_channels}")
        if source.dtype.kind not in "biu":
            raise SlideError(self.slide_id, file, f"mask dtype {source.dtype} is not integer or bool")
        if source.shape == self.shape:
            return _MaskView(source, "same", 1)
        if self.level_downsample > 1 and source.shape == self._base_shape:
            return _MaskView(source, "subsample", self.level_downsample)
        factor = _integer_downsample(self.shape, source.shape)
        if factor is not None and factor > 1:
            return _MaskView(source, "upsample", factor)
        raise SlideError(self.slide_id, file, f"mask shape {source.shape} does not match the image: "
                         f"level shape {self.shape}, level-0 shape {self._base_shape} "
                         "(must be the level's or level 0's, or an integer fraction of the level's)")

    # -- reading ------------------------------------------------------------------------------------
    def _check_window(self, y: int, x: int, h: int, w: int) -> None:
        if self._stack is None:
            raise RuntimeError(f"slide {self.slide_id!r}: SlideReader used outside its `with` block")
        if h < 0 or w < 0 or y < 0 or x < 0 or y + h > self.shape[0] or x + w > self.shape[1]:
            raise ValueError(f"slide {self.slide_id!r}: window y={y} x={x} h={h} w={w} is outside "
                             f"the level's shape {self.shape}")

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y:y+h, x:x+w] of the chosen level as (h, w, C) in the source dtype."""
        self._check_window(y, x, h, w)
        return self._image.read(y, x, h, w)

    def read_tumour(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Tumour pixels of the window [y:y+h, x:x+w] of the chosen level, (h, w) bool (none without a mask)."""
        self._check_window(y, x, h, w)
        if self._tumour is None:
            return np.zeros((h, w), bool)
        labels = self._tumour.read(y, x, h, w)
        if self._tumour_ids is not None:
            return np.isin(labels, self._tumour_ids)
        if not self._mask_checked:  # `validate` checked the whole mask already
            values = _distinct_values(labels)
            if not values <= {0, 1, 255}:
                raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                                 f"{_format_values(sorted(values))} in window y={y} x={x}); "
                                 "pass tumour_ids to say which labels are tumour")
        return labels != 0

    def read_tissue_mask(self, y: int, x: int, h: int, w: int) -> np.ndarray | None:
        """The given tissue mask (nonzero = tissue) on the window, (h, w) bool; None without one."""
        self._check_window(y, x, h, w)
        return None if self._tissue is None else self._tissue.read(y, x, h, w) != 0

    def thumbnail(self, factor: int) -> np.ndarray:
        """The chosen level reduced `factor` times: (ceil(H/f), ceil(W/f), C) float32 block means.

        Reads window by window (bounded memory) from the coarsest pyramid level whose downsample
        divides the requested one, so a pyramidal slide is never read at full resolution. Edge
        blocks average the pixels they have.
        """
        if factor < 1:
            raise ValueError(f"slide {self.slide_id!r}: thumbnail factor must be >= 1, got {factor}")
        self._check_window(0, 0, 0, 0)
        wanted = factor * self.level_downsample  # in level-0 pixels
        coarser = [d for d in self._pyramid if d > self.level_downsample
                   and d % self.level_downsample == 0 and wanted % d == 0]
        if coarser:
            downsample = max(coarser)
            view = _LevelView(self._level_sources(downsample), 1)
        else:
            downsample, view = self.level_downsample, self._image
        reduction = wanted // downsample
        thumb = np.zeros((math.ceil(view.shape[0] / reduction), math.ceil(view.shape[1] / reduction),
                          self.num_channels))
        for y, x, window in view.scan(multiple_of=reduction):
            means = _block_mean(window.astype(np.float64), reduction)
            thumb[y // reduction:y // reduction + means.shape[0],
                  x // reduction:x // reduction + means.shape[1]] = means
        target = (math.ceil(self.shape[0] / factor), math.ceil(self.shape[1] / factor))
        return _fit(thumb, target).astype(np.float32)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self, mask_values: bool = True) -> None:
        """Checks that need the pixels; raises SlideError.

        Empty slide (zero size, or one value everywhere; the scan stops at the first window that
        varies), mask values ({0,1} or {0,255}, else `tumour_ids` is required), unreadable data.
        `mask_values=False` leaves the mask to `read_tumour`, which then checks every window it reads:
        one decode of the mask instead of two, at the price of finding a label map only where it is read.
        """
        self._check_window(0, 0, 0, 0)
        first_file = self.spec.image_files[0]
        if 0 in self.shape:
            raise SlideError(self.slide_id, first_file, f"empty slide: zero size {self.shape}")
        low = high = None
        for _, _, window in self._image.scan():
            low = window.min() if low is None else min(low, window.min())
            high = window.max() if high is None else max(high, window.max())
            if low != high:
                break
        else:
            raise SlideError(self.slide_id, first_file, f"empty slide: every pixel is {low}")
        if self._tumour is None or not mask_values:
            return
        mask = self._tumour.source
        found: set = set()
        for y, x, h, w in _scan_windows(mask.shape, mask.chunk_shape, 8 + mask.dtype.itemsize):
            found |= _distinct_values(mask.read(slice(y, y + h), slice(x, x + w)))
        if self._tumour_ids is None and not (found <= {0, 1} or found <= {0, 255}):
            raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                             f"{_format_values(sorted(found))}); pass tumour_ids to say which "
                             "labels are tumour")
        self._mask_checked = True


def _common_pyramid(level_shapes: list[list[tuple[int, int]]]) -> dict[int, list[int]]:
    """{downsample: level index in each file} for the integer downsamples every file has."""
    per_file = []
    for shapes in level_shapes:
        by_downsample: dict[int, int] = {}
        for index, shape in enumerate(shapes):
            factor = _integer_downsample(shapes[0], shape)
            if factor is not None and factor not in by_downsample:
                by_downsample[factor] = index
        per_file.append(by_downsample)
    common = set.intersection(*(set(levels) for levels in per_file))
    return {d: [levels[d] for levels in per_file] for d in sorted(common)}
