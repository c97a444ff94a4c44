"""Lazy, region-wise reading of multichannel microscopy slides and their masks.

A slide is one multichannel TIFF, or one TIFF per channel (modality), plus a tumour mask and an
optional tissue mask (a `SlideSpec`, from `gerne_jax.slides.manifest.read_manifest`). `SlideReader` opens
the files with tifffile and reads windows straight from their strips / tiles (`tiff_levels`,
`tiff_windows`; tifffile's zarr store for rarer layouts), so only the strips / tiles a window touches
are decoded; no method ever holds a whole level in memory. Masks are mapped onto the level by `masks`.

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

import contextlib
import math
import pathlib
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

import numpy as np

from gerne_jax.data import dataset
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.masks import MaskView, distinct_values, format_values, mask_file_values, open_mask
from gerne_jax.slides.tiff_levels import (
    LevelView,
    TiffLevel,
    common_pyramid,
    open_tiff,
    reading,
    tiff_level_shapes,
)


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
        self._tiffs = [open_tiff(self.slide_id, file, self._stack) for file in files]
        level_shapes = []
        for file, tiff in zip(files, self._tiffs):
            with reading(self.slide_id, file):
                level_shapes.append(tiff_level_shapes(tiff))
        self._base_shape = level_shapes[0][0]
        for file, tiff, shapes in zip(files, self._tiffs, level_shapes):
            if 0 in shapes[0]:
                raise SlideError(self.slide_id, file, f"empty slide: zero size (series shape "
                                 f"{tiff.series[0].shape}, axes {tiff.series[0].axes!r})")
        self._pyramid = common_pyramid(level_shapes)  # {downsample: level index per file}
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
        self._image = LevelView(self._level_sources(self.level_downsample // area_factor), area_factor)
        self.shape = self._image.shape
        self.dtype = self._image.dtype
        self.num_channels = self._image.num_channels
        self.chunk_shape = self._image.chunk_shape  # the storage chunk in level pixels (decoded whole)
        self.channel_names = self._resolve_channel_names()
        self._tumour = None if self.spec.mask_file is None else self._open_mask(self.spec.mask_file)
        self._tissue = (None if self.spec.tissue_mask_file is None
                        else self._open_mask(self.spec.tissue_mask_file))

    def _open_mask(self, file: pathlib.Path) -> MaskView:
        return open_mask(self.slide_id, file, self._stack, self.shape, self._base_shape, self.level_downsample)

    def _level_sources(self, downsample: int) -> list[TiffLevel]:
        sources = [TiffLevel(tiff, level, self.slide_id, file) for tiff, level, file
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
            values = distinct_values(labels)
            if not values <= {0, 1, 255}:
                raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                                 f"{format_values(sorted(values))} in window y={y} x={x}); "
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
            view = LevelView(self._level_sources(downsample), 1)
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
        found = mask_file_values(self._tumour.source)
        if self._tumour_ids is None and not (found <= {0, 1} or found <= {0, 255}):
            raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                             f"{format_values(sorted(found))}); pass tumour_ids to say which "
                             "labels are tumour")
        self._mask_checked = True
