"""Slide files read through OpenSlide (the optional extra `gerne-jax[openslide]`): MIRAX, Hamamatsu VMS, ...

`OpenSlideFile` is one such file as the reader sees any image file (`gerne_jax.slides.image_files`): its level
shapes, its levels, no channel names, and the pixel size it states; `OpenSlideLevel` reads windows of one
pyramid level with `read_region`, as (h, w, 3) uint8 RGB. Definitions:

- Level coordinates. `read_region` takes the window's top-left corner in level-0 pixels; level pixel (r, c) is
  asked for at (round(c * ds), round(r * ds)), ds = OpenSlide's downsample of the level (`level_downsamples`:
  the mean over the two axes of level-0 size / level size). OpenSlide divides by ds again and, where the
  quotient is not an integer, paints the level's tiles at that sub-pixel offset, interpolating. So a level is
  read exactly, pixel for pixel as stored, only where its ds is an integer. A level whose level-0 sides are
  not multiples of its factor (701 x 901 -> 350 x 450: ds 2.0025) is read shifted by up to 0.5 / ds pixel and
  interpolated, although `tiff_levels.integer_downsample` takes it as downsample 2.
- Background. Pixels outside the scanned area are transparent. openslide-python returns straight
  (non-premultiplied) RGBA, so they are composited onto the slide's background colour (property
  openslide.background-color, hex RRGGBB; white when absent) by the "over" operator:
  rgb = round((rgb * alpha + background * (255 - alpha)) / 255); opaque pixels keep their values.
- Pixel size: openslide.mpp-x / openslide.mpp-y (OpenSlide's microns per level-0 pixel, from the vendor's
  metadata or, for generic TIFF, from the resolution tags in centimetres).

Threads: one OpenSlide handle may be read from several threads at once without locking (OpenSlide's
documented guarantee; openslide-python calls it through ctypes, which releases the GIL), so `read` takes no
lock. `openslide` is imported only here, when a file is opened, so the package works without the extra.
"""
from __future__ import annotations

import contextlib
import pathlib
import types
from collections.abc import Iterator, Mapping

import numpy as np

from gerne_jax.core.errors import InputError
from gerne_jax.slides import physical
from gerne_jax.slides.manifest import SlideError

# Most pixels a side of one `read_region` call: OpenSlide allocates the whole region as 32-bit RGBA (64 MiB).
READ_PIECE = 4096
# Storage tile assumed where OpenSlide states none (properties openslide.level[i].tile-height / -width).
DEFAULT_TILE = (256, 256)
WHITE = (255, 255, 255)
MPP_SOURCE = "OpenSlide openslide.mpp-x/y"


def composite_background(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Straight (non-premultiplied) RGBA (h, w, 4) uint8 over an opaque `background`: (h, w, 3) uint8,
    round((rgb * alpha + background * (255 - alpha)) / 255); fully opaque pixels unchanged."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if (alpha == 255).all():
        return rgb
    alpha = alpha.astype(np.uint32)
    mixed = rgb * alpha + np.asarray(background, np.uint32) * (255 - alpha)
    # n / 255 is never exactly k + 1/2 (255 is odd), so adding 127 and flooring rounds to nearest.
    return ((mixed + 127) // 255).astype(np.uint8)


class OpenSlideFile:
    """One slide file opened with OpenSlide; closed with `stack`."""

    channel_names: tuple[str, ...] = ()  # OpenSlide images are RGB, unnamed

    def __init__(self, slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack):
        openslide = _import_openslide(file)
        self.file, self._slide_id = file, slide_id
        self._errors = (openslide.OpenSlideError, OSError)
        with self._reading("OpenSlide cannot read it"):
            self._slide = openslide.OpenSlide(file)
        stack.callback(self._slide.close)
        properties = self._slide.properties
        self.level_shapes = [(height, width) for width, height in self._slide.level_dimensions]
        self.level_downsamples = tuple(self._slide.level_downsamples)
        self._background = self._background_colour(properties.get("openslide.background-color"))
        self._tiles = [_tile_shape(properties, index) for index in range(len(self.level_shapes))]

    def level(self, index: int) -> OpenSlideLevel:
        return OpenSlideLevel(self, index)

    def pixel_size(self) -> physical.PixelSize | str:
        """openslide.mpp-x/y when both are finite numbers > 0 that agree within 1 %, else the reason."""
        sizes = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            text = self._slide.properties.get(key)
            if text is None:
                return f"OpenSlide states no {key}"
            value = physical.positive_mpp(text)
            if value is None:
                return f"OpenSlide's {key} is {text!r} (must be a finite number > 0)"
            sizes.append(value)
        return physical.isotropic(physical.PixelSize(x=sizes[0], y=sizes[1], source=MPP_SOURCE))

    def _background_colour(self, text: str | None) -> tuple[int, int, int]:
        if text is None:
            return WHITE
        try:
            if len(text) != 6:
                raise ValueError(text)
            return tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            raise SlideError(self._slide_id, self.file, f"OpenSlide property openslide.background-color is "
                             f"{text!r}, not a hex colour RRGGBB") from None

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Re-raises OpenSlide's errors as a SlideError: "<what>: <OpenSlide's message>"."""
        try:
            yield
        except self._errors as error:
            raise SlideError(self._slide_id, self.file, f"{what}: {error}") from error


class OpenSlideLevel:
    """One pyramid level of an `OpenSlideFile`, read window by window as (h, w, 3) uint8."""

    dtype = np.dtype(np.uint8)
    num_channels = 3

    def __init__(self, source: OpenSlideFile, index: int):
        self.file = source.file
        self.shape = source.level_shapes[index]
        self.chunk_shape = source._tiles[index]
        self._source, self._index = source, index
        self._downsample = source.level_downsamples[index]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """Pixels [rows, cols] of this level (positive steps allowed; numpy's clipping) as (h, w, 3) uint8.

        Reads pieces of at most READ_PIECE pixels a side, each the contiguous window covering its stepped
        indices, so the memory held is about the result plus one piece.
        """
        row_indices = range(*rows.indices(self.shape[0]))
        col_indices = range(*cols.indices(self.shape[1]))
        if row_indices.step < 1 or col_indices.step < 1:
            raise ValueError(f"{self.file}: level reads need positive steps, got rows {rows}, cols {cols}")
        window = np.empty((len(row_indices), len(col_indices), 3), np.uint8)
        for i0, i1 in _pieces(row_indices):
            for j0, j1 in _pieces(col_indices):
                piece_rows, piece_cols = row_indices[i0:i1], col_indices[j0:j1]
                covering = self._read_contiguous(piece_rows[0], piece_cols[0], piece_rows[-1] - piece_rows[0] + 1,
                                                 piece_cols[-1] - piece_cols[0] + 1)
                window[i0:i1, j0:j1] = covering[::row_indices.step, ::col_indices.step]
        return window

    def _read_contiguous(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        location = (round(x * self._downsample), round(y * self._downsample))  # level 0 (module docstring)
        with self._source._reading(f"OpenSlide cannot read level {self._index} window y={y} x={x} h={h} w={w}"):
            rgba = np.asarray(self._source._slide.read_region(location, self._index, (w, h)))
        return composite_background(rgba, self._source._background)


def _pieces(indices: range) -> list[tuple[int, int]]:
    """[start, stop) runs of positions in `indices` whose source pixels span at most READ_PIECE."""
    per_piece = (READ_PIECE - 1) // indices.step + 1  # n indices span (n - 1) * step + 1 pixels
    return [(start, min(start + per_piece, len(indices))) for start in range(0, len(indices), per_piece)]


def _tile_shape(properties: Mapping[str, str], index: int) -> tuple[int, int]:
    """The level's (tile-height, tile-width) that OpenSlide states, else DEFAULT_TILE. Only a hint for aligning
    reads, so an absent or odd value falls back rather than failing."""
    try:
        shape = tuple(int(properties[f"openslide.level[{index}].tile-{side}"]) for side in ("height", "width"))
    except (KeyError, ValueError):
        return DEFAULT_TILE
    return shape if min(shape) > 0 else DEFAULT_TILE


def _import_openslide(file: pathlib.Path) -> types.ModuleType:
    try:
        import openslide
    except (ImportError, OSError) as error:  # openslide-python without its library raises ModuleNotFoundError
        raise InputError(f"reading {file} needs OpenSlide: pip install 'gerne-jax[openslide]' ({error})") from error
    return openslide
