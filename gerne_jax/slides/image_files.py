"""The image files of a slide, one class per reading backend, behind one factory.

    image = open_image_file(slide_id, file, stack, backend="auto")
    image.level_shapes, image.channel_names, image.pixel_size(), image.level(i).read(rows, cols)

Backends: "tifffile" (`tiff_levels.TiffImageFile`: every TIFF layout the reader supports, including
OME-TIFF, Aperio SVS, NDPI, and pyramids as SubIFDs or pages) and "openslide" (`openslide_file.OpenSlideFile`,
the optional extra `gerne-jax[openslide]`: the formats tifffile cannot read, e.g. MIRAX .mrxs and Hamamatsu
.vms, as 8-bit RGB). "auto" picks OpenSlide for the extensions in `OPENSLIDE_SUFFIXES` and tifffile otherwise.
Both yield identical pixels for a file both can read (the reader uses OpenSlide levels only where their
downsample is an integer: OpenSlide interpolates the others).
"""
from __future__ import annotations

import contextlib
import pathlib
from typing import Protocol

from gerne_jax.core.errors import InputError
from gerne_jax.slides import physical
from gerne_jax.slides.tiff_levels import TiffImageFile
from gerne_jax.slides.views import LevelSource

BACKENDS = ("auto", "tifffile", "openslide")
# Slide formats that are not TIFF files (tifffile cannot open them).
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu")


class ImageFile(Protocol):
    """What the slide reader needs of an image file, whatever reads it."""

    file: pathlib.Path
    level_shapes: list[tuple[int, int]]  # (height, width) per pyramid level, level 0 first
    channel_names: tuple[str, ...]       # as the file names them, () when it does not
    # The backend's own downsample per level where it may be fractional (OpenSlide interpolates such a
    # level, so the reader does not read it as an integer downsample); None where levels are read as stored.
    level_downsamples: tuple[float, ...] | None

    def level(self, index: int) -> LevelSource: ...

    def pixel_size(self) -> physical.PixelSize | str: ...  # a reason when the file states none


def backend_for(file: pathlib.Path, backend: str) -> str:
    """The backend "auto" means for `file`; other values are checked and returned."""
    if backend not in BACKENDS:
        raise InputError(f"--reader must be one of {list(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "openslide" if file.suffix.lower() in OPENSLIDE_SUFFIXES else "tifffile"


def open_image_file(slide_id: str, file: pathlib.Path, stack: contextlib.ExitStack, backend: str = "auto") -> ImageFile:
    """Opens `file` with `backend` (module docstring); the file stays open in `stack`."""
    if backend_for(file, backend) == "openslide":
        from gerne_jax.slides.openslide_file import OpenSlideFile  # imports openslide, an optional extra

        return OpenSlideFile(slide_id, file, stack)
    return TiffImageFile(slide_id, file, stack)
