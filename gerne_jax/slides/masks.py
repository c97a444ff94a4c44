"""Tumour and tissue masks: reading them (TIFF lazily, PNG whole) onto a slide level's pixel grid.

A mask file has the level's shape, level 0's (pixel (i, j) of the level is `mask[i * d, j * d]`:
nearest, top-left), or an integer fraction f of the level's (pixel (i, j) is `mask[i // f, j // f]`);
`open_mask` maps it onto the level (`MaskView`). Tiling at microns per pixel maps a mask of level 0's
shape, or an integer fraction of it, by area coverage instead (`open_coverage_mask`, `CoverageMask`).
PNG masks are read whole through Pillow, which refuses PNGs above its decompression-bomb limit; a grey
mask saved in colour is taken as grey.
`distinct_values` and `format_values` serve the checks of mask values ({0, 1}, {0, 255}, or labels).
"""
from __future__ import annotations

import contextlib
import pathlib
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from gerne_jax.slides import resample
from gerne_jax.slides.manifest import SlideError
from gerne_jax.slides.tiff_levels import TiffLevel, integer_downsample, open_tiff
from gerne_jax.slides.views import scan_windows


class MemoryArray:
    """A small (H, W) array read whole (PNG masks), with the same `read` as `TiffLevel`."""

    def __init__(self, array: np.ndarray, file: pathlib.Path):
        self.file = file
        self.shape = array.shape[:2]
        self.dtype = array.dtype
        self.num_channels = 1
        self.chunk_shape = (1, 1)  # in memory: no decoding to align to
        self._array = array

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self._array[rows, cols][..., None]


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


class MaskView:
    """A mask file mapped onto the chosen level's pixel grid ("same", "subsample" or "upsample")."""

    def __init__(self, source: TiffLevel | MemoryArray, mode: str, factor: int):
        self.source, self.mode, self.factor = source, mode, factor

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        rows, row_index = _index_map(y, h, self.mode, self.factor, self.source.shape[0])
        cols, col_index = _index_map(x, w, self.mode, self.factor, self.source.shape[1])
        window = self.source.read(rows, cols)[..., 0]
        if row_index is not None:
            window = window[row_index][:, col_index]
        return window


def read_png_mask(slide_id: str, file: pathlib.Path) -> MemoryArray:
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
    return MemoryArray(array, file)


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


def distinct_values(array: np.ndarray) -> set:
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


def format_values(values: Sequence, limit: int = 20) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} distinct)"


class CoverageMask:
    """A mask file resampled onto a grid of `scale` of its pixels by area coverage (`resample`): a grid
    pixel is inside when at least half of its area is. `inside(labels)` turns the file's values into
    0 / 1 before the areas are taken (tumour labels, or nonzero). Where a grid pixel reaches past the
    mask's end (a pyramid level rounded up, a mask rounded down), the part outside counts as not inside."""

    def __init__(self, source: TiffLevel | MemoryArray, scale: float, shape: tuple[int, int],
                 inside: Callable[[np.ndarray], np.ndarray]):
        self.source, self.scale, self.shape, self._inside = source, scale, shape, inside

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window [y:y+h, x:x+w] of the grid, (h, w) bool."""
        rows = resample.taps(y, h, self.scale, self.source.shape[0])
        cols = resample.taps(x, w, self.scale, self.source.shape[1])
        labels = self.source.read(slice(rows.start, rows.stop), slice(cols.start, cols.stop))[..., 0]
        return resample.covered(resample.weighted(self._inside(labels), rows, cols))


def mask_source(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack) -> TiffLevel | MemoryArray:
    """A mask file's pixels: a TIFF read lazily (staying open in `stack`), a PNG read whole."""
    if file.suffix.lower() == ".png":
        source = read_png_mask(slide_id, file)
    else:
        source = TiffLevel(open_tiff(slide_id, file, stack), 0, slide_id, file)
        if source.num_channels != 1:
            raise SlideError(slide_id, file, f"mask must have one channel, found {source.num_channels}")
    if source.dtype.kind not in "biu":
        raise SlideError(slide_id, file, f"mask dtype {source.dtype} is not integer or bool")
    return source


def open_coverage_mask(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack, shape: tuple[int, int],
                       base_shape: tuple[int, int], scale: float,
                       inside: Callable[[np.ndarray], np.ndarray]) -> CoverageMask:
    """A mask file at level 0's shape, or an integer fraction f of it, on a grid of `shape` pixels of
    `scale` level-0 pixels (tiling at microns per pixel), by area coverage."""
    source = mask_source(slide_id, file, stack)
    factor = 1 if source.shape == base_shape else integer_downsample(base_shape, source.shape)
    if factor is None:
        raise SlideError(slide_id, file, f"mask shape {source.shape} does not match the image: tiling at a "
                         f"physical scale needs a mask of level 0's shape {base_shape} or an integer fraction of it")
    return CoverageMask(source, scale / factor, shape, inside)


def open_mask(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack, shape: tuple[int, int],
              base_shape: tuple[int, int], level_downsample: int) -> MaskView:
    """A mask file on the grid of a level of `shape` (level 0: `base_shape`, the level `level_downsample`
    times smaller): at the level's shape, level 0's, or an integer fraction of the level's (annotations
    are often rasterised at a reduced scale; each mask pixel then covers factor x factor level pixels)."""
    source = mask_source(slide_id, file, stack)
    if source.shape == shape:
        return MaskView(source, "same", 1)
    if level_downsample > 1 and source.shape == base_shape:
        return MaskView(source, "subsample", level_downsample)
    factor = integer_downsample(shape, source.shape)
    if factor is not None and factor > 1:
        return MaskView(source, "upsample", factor)
    raise SlideError(slide_id, file, f"mask shape {source.shape} does not match the image: "
                     f"level shape {shape}, level-0 shape {base_shape} "
                     "(must be the level's or level 0's, or an integer fraction of the level's)")


def mask_file_values(source: TiffLevel | MemoryArray) -> set:
    """The distinct values of a whole mask file, read window by window in bounded memory."""
    found: set = set()
    for y, x, h, w in scan_windows(source.shape, source.chunk_shape, 8 + source.dtype.itemsize):
        found |= distinct_values(source.read(slice(y, y + h), slice(x, x + w)))
    return found
