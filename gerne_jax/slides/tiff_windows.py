"""Windows of one TIFF pyramid level, decoded straight from its strips or tiles.

tifffile's zarr store reads a window through zarr's event loop: a coroutine per chunk, each decoded
chunk wrapped in a zarr buffer and copied into the window by zarr's generic indexing, all on one
thread. For the layouts slides come in (one page per level, or one single-sample page per channel;
tiled or stripped; chunky or planar; any compression tifffile decodes) `PageWindows` does the same
work with less overhead: it reads the segments (strips or tiles) a window touches with tifffile's
`FileHandle.read_segments` under the file's lock, decodes them with the page's own decoder
(`TiffPage.decode`, the function tifffile's store and `asarray` use) on a small thread pool, and
copies each segment's part of the window once. Windows may have steps (masks read at a subsampled
grid): only the segments holding a visited row and column are decoded.

Uncompressed pages stored in one piece are memory-mapped (tifffile's `FileHandle.memmap_array`)
and sliced, so a window of an image written as one strip reads only its own bytes.

Decoded segments stay in an LRU (`set_cache_bytes`): consecutive windows of a band scan share the
row of segments their common edge cuts, which is then decoded once. Several threads may read at
once; a segment that one of them is decoding is waited for, not decoded again.

`PageWindows.of_level` returns None for other layouts (several pages per channel, volumes, pages that
disagree); `tiff_levels.TiffLevel` then reads through the zarr store.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts a pool of its own on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One process-wide pool for segment decoding (codecs release the GIL), created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                          thread_name_prefix="tiff_decode")
        return _pool


def _overlap(start: int, stop: int, step: int, segment_start: int, segment_stop: int
             ) -> tuple[slice, slice] | None:
    """(window slice, segment slice) of the visited positions start, start + step, ... < stop that fall
    in [segment_start, segment_stop); None if none does."""
    first = max(0, -(-(segment_start - start) // step))
    end = -(-(min(stop, segment_stop) - start) // step)
    if end <= first:
        return None
    source = start + first * step - segment_start
    return slice(first, end), slice(source, source + (end - first - 1) * step + 1, step)


class PageWindows:
    """Reads (h, w, C) windows of a level stored as one page, or as one single-sample page per channel."""

    def __init__(self, pages: Sequence[tifffile.TiffPage | tifffile.TiffFrame]):
        keyframe = pages[0].keyframe
        self._pages = list(pages)
        self._decode = keyframe.decode
        self._fh = keyframe.parent.filehandle
        self._fh.set_lock(True)  # the lock tifffile's own readers (its zarr store) take for seeks and reads
        self.dtype = np.dtype(keyframe.dtype)
        self._nodata = keyframe.nodata
        planes, _, self.height, self.width, contig = keyframe.shaped
        self.num_channels = planes * contig * len(pages)
        if keyframe.is_tiled:
            self.segment_shape = (keyframe.tilelength, keyframe.tilewidth)
        else:
            self.segment_shape = (min(keyframe.rowsperstrip, self.height), self.width)
        self._grid = (math.ceil(self.height / self.segment_shape[0]), math.ceil(self.width / self.segment_shape[1]))
        self._planes = planes
        self._segment_bytes = self.segment_shape[0] * self.segment_shape[1] * contig * self.dtype.itemsize
        self._capacity = 0  # segments kept (`set_cache_bytes`)
        # Uncompressed pages stored in one piece (often a single strip of the whole image) are mapped
        # into memory instead: a window then reads its own bytes only.
        self._mapped = None
        if all(page.is_memmappable for page in pages):
            self._mapped = [self._fh.memmap_array(keyframe.parent.byteorder + keyframe._dtype.char, keyframe.shaped,
                                                  offset=page.dataoffsets[0]) for page in pages]
        self._cache: collections.OrderedDict[tuple[int, int], concurrent.futures.Future] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def set_cache_bytes(self, value: int) -> None:
        """Bytes of decoded segments to keep; a segment larger than that (a whole page in one strip) is
        decoded for each read, not kept."""
        self._capacity = value // self._segment_bytes

    @classmethod
    def of_level(cls, level_series: tifffile.TiffPageSeries, num_channels: int) -> PageWindows | None:
        """The reader of a level whose pages it handles (module docstring), else None."""
        pages = list(level_series.pages)
        if not pages or any(page is None for page in pages):
            return None
        keyframe = pages[0].keyframe
        if keyframe.dtype is None or any(page.keyframe.hash != keyframe.hash for page in pages):
            return None  # pages that one decoder cannot read (tifffile caches decoders by this hash)
        planes, depth, height, width, contig = keyframe.shaped
        if depth != 1 or (len(pages) > 1 and planes * contig != 1):
            return None
        windows = cls(pages)
        expected = math.prod(level_series.shape)
        if windows.num_channels != num_channels or expected != height * width * windows.num_channels:
            return None
        return windows

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels [rows, cols] (slices may have steps) as (h, w, C) in the source dtype."""
        row_start, row_stop, row_step = rows.indices(self.height)
        col_start, col_stop, col_step = cols.indices(self.width)
        out = np.empty((len(range(row_start, row_stop, row_step)), len(range(col_start, col_stop, col_step)),
                        self.num_channels), self.dtype)
        if out.size == 0:
            return out
        if self._mapped is not None:
            parts = [mapped[:, 0, rows, cols, :] for mapped in self._mapped]  # (planes, h, w, contig) each
            return np.concatenate([np.moveaxis(part, 0, 2).reshape(out.shape[0], out.shape[1], -1) for part in parts],
                                  axis=-1, out=out)
        segment_h, segment_w = self.segment_shape
        segment_rows = np.unique(np.arange(row_start, row_stop, row_step) // segment_h)
        segment_cols = np.unique(np.arange(col_start, col_stop, col_step) // segment_w)
        per_plane = self._grid[0] * self._grid[1]
        keys = [(page, plane * per_plane + row * self._grid[1] + col)
                for page in range(len(self._pages)) for plane in range(self._planes)
                for row in segment_rows.tolist() for col in segment_cols.tolist()]
        for (page, _), (segment, (plane, _, top, left, _)) in zip(keys, self._segments(keys)):
            row_part = _overlap(row_start, row_stop, row_step, top, min(top + segment_h, self.height))
            col_part = _overlap(col_start, col_stop, col_step, left, min(left + segment_w, self.width))
            if row_part is None or col_part is None:
                continue
            channel = page + plane if len(self._pages) > 1 or self._planes > 1 else slice(None)
            target = out[row_part[0], col_part[0], channel]
            if segment is None:  # an empty segment (offset or byte count 0): tifffile fills in nodata
                target[...] = self._nodata
            else:
                part = segment[0, row_part[1], col_part[1]]
                target[...] = part if isinstance(channel, slice) else part[..., 0]
        return out

    def _segments(self, keys: list[tuple[int, int]]) -> list[tuple[np.ndarray | None, tuple[int, ...]]]:
        """(decoded segment (1, h, w, samples) or None, its position (plane, depth, y, x, sample)) per key."""
        claimed, futures = [], []
        with self._cache_lock:
            for key in keys:
                future = self._cache.get(key)
                if future is None:
                    future = self._cache[key] = concurrent.futures.Future()
                    claimed.append((key, future))
                else:
                    self._cache.move_to_end(key)
                futures.append(future)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        if claimed:
            self._decode_claimed(claimed)
        return [future.result() for future in futures]

    def _decode_claimed(self, claimed: list[tuple[tuple[int, int], concurrent.futures.Future]]) -> None:
        """Reads the claimed segments' bytes in file order and decodes them, on the pool when several;
        every claimed future ends resolved (with the error, if any), so no waiting thread hangs."""
        pool = _decode_pool() if len(claimed) > 1 else None
        decoding = []
        try:
            for page_index in sorted({key[0] for key, _ in claimed}):
                page = self._pages[page_index]
                by_index = {key[1]: future for key, future in claimed if key[0] == page_index}
                indices = list(by_index)
                arguments = {}
                if page.jpegtables is not None:
                    arguments["jpegtables"] = page.jpegtables
                if page.keyframe.jpegheader is not None:
                    arguments["jpegheader"] = page.keyframe.jpegheader
                for data, index in self._fh.read_segments([page.dataoffsets[i] for i in indices],
                                                          [page.databytecounts[i] for i in indices],
                                                          indices, lock=self._fh.lock):
                    task = (by_index[index], (page_index, index), data, arguments)
                    if pool is None:
                        self._resolve(*task)
                    else:
                        decoding.append(pool.submit(self._resolve, *task))
        except BaseException as error:
            concurrent.futures.wait(decoding)
            for key, future in claimed:
                if not future.done():
                    future.set_exception(error)
                    self._forget(key, future)
            raise

    def _resolve(self, future: concurrent.futures.Future, key: tuple[int, int], data: bytes | None,
                 arguments: dict[str, Any]) -> None:
        try:
            segment, position, _ = self._decode(data, key[1], **arguments)
        except BaseException as error:
            self._forget(key, future)
            future.set_exception(error)
        else:
            future.set_result((segment, position))

    def _forget(self, key: tuple[int, int], future: concurrent.futures.Future) -> None:
        """Drops a failed segment from the cache: a later read tries again rather than reuse the failure."""
        with self._cache_lock:
            if self._cache.get(key) is future:
                del self._cache[key]
