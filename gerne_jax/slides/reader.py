"""Lazy, region-wise reading of multichannel microscopy slides and their labels.

A slide is one multichannel image file, or one file per channel (modality), plus a tumour mask or QuPath
annotations and an optional tissue mask (a `SlideSpec`, from `gerne_jax.slides.manifest.read_manifest`).
`SlideReader` opens the files through a backend (`image_files`: tifffile, or OpenSlide for the formats
tifffile cannot read) and reads windows straight from their strips / tiles, so only the strips / tiles a
window touches are decoded; no method ever holds a whole level in memory.

Supported TIFF files: stripped or tiled, uncompressed / deflate / LZW / JPEG / zstd / anything
tifffile+imagecodecs decode, classic or BigTIFF; samples interleaved (Y, X, C), planar (C, Y, X), or one
page per channel (shaped, ImageJ and OME hyperstacks, plain page-by-page stacks); pyramids as SubIFDs,
OME levels or reduced pages (Aperio SVS too). The first series of a file is read (others, e.g. label or
macro images, are ignored, but several series of one shape are an error: they may be channels). Axes of
length one (T, Z, ...) are ignored; exactly one axis besides Y and X may hold the channels. Pixel types
uint8, uint16 and float32. `channels` reads the named channels only, in the order named.

Resolution. `level=L` reads pyramid level L. `downsample=d` reads the pyramid level whose downsample is
d when every image file has one; otherwise it reads level 0 and reduces it by the **area mean** of d x d
blocks (rounded back to the source dtype; the level then has floor(H0/d) x floor(W0/d) pixels).
`mpp=M` reads at M microns per pixel: the slide's level-0 pixel size (the manifest's `mpp`, else what the
file states, `physical`) gives M as s0 level-0 pixels; the coarsest pyramid level of downsample d <= s0
is read and resampled by s = s0 / d with the area mean of `resample` (none when s is within
`SCALE_TOLERANCE` of 1), giving floor(H_d / s) x floor(W_d / s) pixels. `scale` is the level-0 pixels per
pixel read (d, or d * s), `mpp` the microns per pixel read where known.

Masks (TIFF, read lazily, or PNG, read whole through Pillow, which refuses PNGs above its
decompression-bomb limit) hold {0, 1}, {0, 255}, or labels with `tumour_ids` naming the tumour labels.
A tumour mask has the chosen level's shape or level 0's shape; in the latter case pixel (i, j) of the
level is `mask[i * d, j * d]` (nearest, top-left). A tissue mask (nonzero = tissue) may also have a
shape an integer factor f smaller than the level's, then pixel (i, j) is `tissue[i // f, j // f]`.
At `mpp`, masks of level 0's shape or an integer fraction of it are mapped by area coverage (a pixel is
inside when at least half of it is; `masks.CoverageMask`), resampled or not. Annotations (`annotations`) are
rasterised at the pixels read: the polygons of `tumour_classes` are tumour, those of `tissue_classes`
(when given and no tissue mask is) tissue.
"""
from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from gerne_jax.data import dataset
from gerne_jax.slides.annotations import AnnotationMask, Annotations
from gerne_jax.slides.image_files import open_image_file
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.masks import (
    CoverageMask,
    MaskView,
    distinct_values,
    format_values,
    mask_file_values,
    open_coverage_mask,
    open_mask,
)
from gerne_jax.slides.tiff_levels import common_pyramid
from gerne_jax.slides.views import LevelSource, LevelView, ResampledView, scan_windows

# A pyramid level within this relative distance of the target scale is read as it is, not resampled (a
# slide of 0.2502 µm/pixel tiled at 0.25 µm/pixel): scanners round the pixel size they state.
SCALE_TOLERANCE = 1e-3


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
                 tumour_ids: Sequence[int] | None = None, *, mpp: float | None = None,
                 channels: Sequence[str] | None = None, tumour_classes: Sequence[str] | None = None,
                 tissue_classes: Sequence[str] | None = None, backend: str = "auto"):
        if not spec.image_files:
            raise ValueError(f"slide {spec.slide_id!r}: no image files")
        if level < 0:
            raise ValueError(f"slide {spec.slide_id!r}: level must be >= 0, got {level}")
        if downsample is not None and downsample < 1:
            raise ValueError(f"slide {spec.slide_id!r}: downsample must be >= 1, got {downsample}")
        if sum([level != 0, downsample is not None, mpp is not None]) > 1:
            raise ValueError(f"slide {spec.slide_id!r}: give one of level, downsample and mpp "
                             f"(level={level}, downsample={downsample}, mpp={mpp})")
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"slide {spec.slide_id!r}: mpp must be > 0, got {mpp}")
        self.spec = spec
        self.slide_id = spec.slide_id
        self._level = level
        self._downsample = downsample
        self._mpp = mpp
        self._wanted_channels = None if channels is None else tuple(channels)
        self._tumour_classes = None if tumour_classes is None else tuple(tumour_classes)
        self._tissue_classes = None if tissue_classes is None else tuple(tissue_classes)
        self._backend = backend
        self._tumour_ids = None if tumour_ids is None else np.asarray(sorted(set(tumour_ids)))
        self._stack: contextlib.ExitStack | None = None
        self._annotations_read: Annotations | None = None
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
        self._files = [open_image_file(self.slide_id, file, self._stack, self._backend) for file in files]
        level_shapes = [image.level_shapes for image in self._files]
        self.base_shape = level_shapes[0][0]
        for image in self._files:
            if 0 in image.level_shapes[0]:
                raise SlideError(self.slide_id, image.file, f"empty slide: zero size (level shapes "
                                 f"{image.level_shapes})")
        self._pyramid = common_pyramid(level_shapes)  # {downsample: level index per file}
        # OpenSlide interpolates a level whose own downsample is fractional (an odd side halved): such a
        # level is not read as the integer downsample its shape suggests (`openslide_file`).
        self._pyramid = {d: levels for d, levels in self._pyramid.items()
                         if all(image.level_downsamples is None or image.level_downsamples[i] == d
                                for image, i in zip(self._files, levels))}
        self.base_mpp, self.pixel_size_unknown = self._resolve_pixel_size()
        self._resample_scale = 1.0
        if self._mpp is not None:
            self.level_downsample, area_factor = self._level_for_mpp(), 1
        elif self._downsample is None:
            for image in self._files:
                if self._level >= len(image.level_shapes):
                    raise SlideError(self.slide_id, image.file, f"level {self._level} requested but the "
                                     f"file has {len(image.level_shapes)} level(s)")
            matches = [d for d, levels in self._pyramid.items() if levels == [self._level] * len(files)]
            if not matches:
                raise SlideError(self.slide_id, files[0], f"level {self._level} is not an integer "
                                 f"downsample of level 0 in every file (level shapes {level_shapes})")
            self.level_downsample, area_factor = matches[0], 1
        elif self._downsample in self._pyramid:
            self.level_downsample, area_factor = self._downsample, 1
        else:  # no pyramid level with this downsample: area mean of level 0
            self.level_downsample, area_factor = self._downsample, self._downsample
        self._area_factor = area_factor
        self._sources = self._level_sources(self.level_downsample // area_factor)  # the level read, every file
        self.file_channel_names = self._resolve_channel_names(sum(source.num_channels for source in self._sources))
        self.dtype = self._sources[0].dtype
        # Level-0 pixels per pixel read, and the microns per pixel read where known.
        self.scale = (self.level_downsample if self._resample_scale == 1.0
                      else self.level_downsample * self._resample_scale)
        self.mpp = None if self.base_mpp is None else self.base_mpp * self.scale
        self.select_channels(self._wanted_channels)
        self._tumour = self._tumour_source()
        self._tissue = self._tissue_source()

    def _resolve_pixel_size(self) -> tuple[float | None, str | None]:
        """Microns per level-0 pixel (the manifest's, else the files'), or None and why it is unknown."""
        if self.spec.mpp is not None:
            return self.spec.mpp, None
        sizes = [image.pixel_size() for image in self._files]
        reasons = [f"{image.file.name}: {size}" for image, size in zip(self._files, sizes) if isinstance(size, str)]
        if reasons:
            return None, reasons[0] if len(self._files) > 1 else sizes[0]
        values = [size.mpp for size in sizes]
        if max(values) > min(values) * (1 + SCALE_TOLERANCE):
            return None, f"the channel files state different pixel sizes {values} µm"
        return values[0], None

    def _level_for_mpp(self) -> int:
        """The coarsest pyramid level at or finer than the wanted mpp; sets the resampling scale."""
        if self.base_mpp is None:
            raise SlideError(self.slide_id, self.spec.image_files[0], f"pixel size unknown: "
                             f"{self.pixel_size_unknown}; give it in the manifest's mpp column (microns per pixel)")
        found = self._finer_level(self._mpp / self.base_mpp)
        if found is None:
            raise SlideError(self.slide_id, self.spec.image_files[0], f"mpp {self._mpp:g} is finer than the "
                             f"slide's level 0 ({self.base_mpp:g} µm/pixel); upsampling is not supported")
        downsample, self._resample_scale = found
        return downsample

    def _finer_level(self, target: float) -> tuple[int, float] | None:
        """(d, s) for `target` level-0 pixels per pixel: the coarsest pyramid downsample d at or finer than
        it, and the scale s = target / d left to resample (1.0 within SCALE_TOLERANCE: a level that close
        counts as at the target, even if a little coarser); None when level 0 is coarser still."""
        near = [d for d in self._pyramid if d <= target or abs(target / d - 1) <= SCALE_TOLERANCE]
        if not near:
            return None
        downsample = max(near)
        scale = target / downsample
        return downsample, 1.0 if abs(scale - 1) <= SCALE_TOLERANCE else scale

    def select_channels(self, names: Sequence[str] | None) -> None:
        """Reads the channels `names` in this order (all channels, in the files' order, for None); a
        SlideError names the ones the slide lacks."""
        available = self.file_channel_names
        if names is None:
            indices = None
        else:
            missing = [name for name in names if name not in available]
            if missing:
                raise SlideError(self.slide_id, self.spec.image_files[0], f"no channel(s) named {missing}; the "
                                 f"slide's channels are {list(available)}")
            indices = [available.index(name) for name in names]
        view = LevelView(self._sources, self._area_factor, indices)
        self._channel_indices = indices
        self._image = view if self._resample_scale == 1.0 else ResampledView(view, self._resample_scale)
        self.shape = self._image.shape
        self.num_channels = self._image.num_channels
        self.chunk_shape = self._image.chunk_shape  # the storage chunk in pixels read (decoded whole)
        self.channel_names = available if indices is None else tuple(available[i] for i in indices)

    @property
    def has_tissue_mask(self) -> bool:
        """Whether tissue comes from a mask or annotations rather than from detection."""
        return self._tissue is not None

    def _tumour_source(self) -> MaskView | CoverageMask | AnnotationMask | None:
        """What `read_tumour` reads: a mask mapped onto the grid, a coverage mask or annotations (or None)."""
        spec = self.spec
        if spec.annotations_file is not None:
            if not self._tumour_classes:
                raise SlideError(self.slide_id, spec.annotations_file, "annotations need --tumour-classes "
                                 "(the QuPath class names that are tumour)")
            return self._annotations().mask(self._tumour_classes, self.scale, self.shape)
        return None if spec.mask_file is None else self._open_mask(spec.mask_file, self._tumour_pixels)

    def _tissue_source(self) -> MaskView | CoverageMask | AnnotationMask | None:
        spec = self.spec
        if spec.tissue_mask_file is not None:
            return self._open_mask(spec.tissue_mask_file, lambda labels: labels != 0)
        if spec.annotations_file is not None and self._tissue_classes:
            return self._annotations().mask(self._tissue_classes, self.scale, self.shape, option="--tissue-classes")
        return None

    def _annotations(self) -> Annotations:
        if self._annotations_read is None:  # read once for the tumour and the tissue classes
            self._annotations_read = Annotations.read(self.slide_id, self.spec.annotations_file)
        return self._annotations_read

    def _open_mask(self, file: pathlib.Path, inside: Callable[[np.ndarray], np.ndarray]) -> MaskView | CoverageMask:
        # At mpp by coverage even where a level is read as it is: the labels must not depend on which levels
        # the file has (a level-0 mask at scale 2 is 2 x 2 blocks at least half inside, pyramid or not).
        if self._mpp is not None:
            return open_coverage_mask(self.slide_id, file, self._stack, self.shape, self.base_shape, self.scale,
                                      inside)
        return open_mask(self.slide_id, file, self._stack, self.shape, self.base_shape, self.level_downsample)

    def _level_sources(self, downsample: int) -> list[LevelSource]:
        sources = [image.level(level) for image, level in zip(self._files, self._pyramid[downsample])]
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

    def _resolve_channel_names(self, num_channels: int) -> tuple[str, ...]:
        """The manifest's names, else the file's (OME channel names), else channel_0, channel_1, ...

        File names are not used: they often carry the slide id, and names must agree across slides.
        """
        if self.spec.channel_names is not None:
            names = tuple(self.spec.channel_names)
            if len(names) != num_channels:
                raise SlideError(self.slide_id, self.spec.image_files[0], f"{len(names)} channel names "
                                 f"{list(names)} for {num_channels} channels")
            return names
        if len(self._files) == 1:
            names = self._files[0].channel_names
            if len(names) == num_channels and len(set(names)) == len(names):
                return names
        return placeholder_channel_names(num_channels)

    def _tumour_pixels(self, labels: np.ndarray, where: str = "") -> np.ndarray:
        """Tumour pixels of mask values: `tumour_ids`, else nonzero of a binary mask (checked)."""
        if self._tumour_ids is not None:
            return np.isin(labels, self._tumour_ids)
        if not self._mask_checked:  # `validate` checked the whole mask already
            values = distinct_values(labels)
            if not values <= {0, 1, 255}:
                raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                                 f"{format_values(sorted(values))}{where}); pass tumour_ids to say which "
                                 "labels are tumour")
        return labels != 0

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
        if isinstance(self._tumour, MaskView):
            return self._tumour_pixels(self._tumour.read(y, x, h, w), f" in window y={y} x={x}")
        return self._tumour.read(y, x, h, w)  # coverage and annotation masks are bool already

    def read_tissue_mask(self, y: int, x: int, h: int, w: int) -> np.ndarray | None:
        """The given tissue mask (nonzero = tissue; or the tissue classes' annotations) on the window, (h, w)
        bool; None without one."""
        self._check_window(y, x, h, w)
        if self._tissue is None:
            return None
        pixels = self._tissue.read(y, x, h, w)
        return pixels != 0 if isinstance(self._tissue, MaskView) else pixels

    def thumbnail(self, factor: int) -> np.ndarray:
        """The chosen level reduced `factor` times: (ceil(H/f), ceil(W/f), C) float32 block means.

        Reads window by window (bounded memory) from the coarsest pyramid level whose downsample
        divides the requested one, so a pyramidal slide is never read at full resolution. Edge
        blocks average the pixels they have.
        """
        if factor < 1:
            raise ValueError(f"slide {self.slide_id!r}: thumbnail factor must be >= 1, got {factor}")
        self._check_window(0, 0, 0, 0)
        if self._resample_scale != 1.0:
            return self._resampled_thumbnail(factor)
        wanted = factor * self.level_downsample  # in level-0 pixels
        coarser = [d for d in self._pyramid if d > self.level_downsample
                   and d % self.level_downsample == 0 and wanted % d == 0]
        if coarser:
            downsample = max(coarser)
            view = LevelView(self._level_sources(downsample), 1, self._channel_indices)
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

    def _resampled_thumbnail(self, factor: int) -> np.ndarray:
        """`thumbnail` of a resampled grid: the area means (`resample`) of the coarsest pyramid level at or
        finer than factor x the grid's pixel, read window by window. Rows / columns past the last one whose
        square that level covers whole repeat it (`_fit`)."""
        # factor x the grid's pixel is > 1 level-0 pixel here (the grid is resampled by s > 1): never None
        downsample, scale = self._finer_level(factor * self.scale)
        view = ResampledView(LevelView(self._level_sources(downsample), 1, self._channel_indices), scale)
        thumb = np.zeros((*view.shape, self.num_channels))
        for y, x, h, w in scan_windows(view.shape, view.chunk_shape, view.scan_bytes_per_pixel):
            thumb[y:y + h, x:x + w] = view.read_means(y, x, h, w)
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
        if not isinstance(self._tumour, MaskView | CoverageMask) or not mask_values:
            return
        found = mask_file_values(self._tumour.source)
        if self._tumour_ids is None and not (found <= {0, 1} or found <= {0, 255}):
            raise SlideError(self.slide_id, self.spec.mask_file, "mask is a label map (values "
                             f"{format_values(sorted(found))}); pass tumour_ids to say which "
                             "labels are tumour")
        self._mask_checked = True
