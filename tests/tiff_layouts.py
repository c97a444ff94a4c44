"""Write one (H, W, C) array in every TIFF layout the slide reader supports (test helper).

Shared by the reader and tiler tests: each layout is written with tifffile from a numpy array, so a
test can compare what `gerne_jax.slides.reader.SlideReader` returns with the array itself.

    paths = write_layout(tmp_path / "slide", image, "ome_pyramid", compression="zlib", levels=3)
    expected_level_1 = pyramid_levels(image, 3)[1]

Layouts (`LAYOUTS`):
  interleaved      one page, samples interleaved (Y, X, C)
  planar           one page, planar configuration "separate" (C, Y, X)
  multipage        one page per channel, shaped series (tifffile's own metadata)
  multipage_plain  one page per channel written page by page without metadata (as libtiff/Pillow do)
  imagej           ImageJ hyperstack, one page per channel (axes CYX)
  ome              OME-TIFF, one page per channel (axes CYX)
  ome_pyramid      OME-TIFF with reduced levels in SubIFDs
  subifd_pyramid   interleaved (Y, X, C) with reduced levels in SubIFDs (no OME)
  per_channel      one single-channel file per channel (returns C paths)
Every layout is stripped unless `tile=(th, tw)` is given; `bigtiff=True` writes BigTIFF (except
"imagej": ImageJ hyperstacks are classic TIFF). Interleaved JPEG needs C == 3 (written as RGB).
"""
from __future__ import annotations

import pathlib

import numpy as np
import tifffile

from gerne_jax.slides.manifest import SlideSpec

LAYOUTS = (
    "interleaved",
    "planar",
    "multipage",
    "multipage_plain",
    "imagej",
    "ome",
    "ome_pyramid",
    "subifd_pyramid",
    "per_channel",
)
PYRAMID_LAYOUTS = ("ome_pyramid", "subifd_pyramid")
# Layouts that put each channel in its own page / plane, so JPEG (1 or 3 components) works for any C.
PLANE_PER_CHANNEL_LAYOUTS = ("planar", "multipage", "multipage_plain", "imagej", "ome", "ome_pyramid", "per_channel")


def pyramid_levels(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Levels 0..levels-1 of a factor-2 pyramid, each by 2x2 striding of the previous (exact dtype)."""
    arrays = [image]
    for _ in range(levels - 1):
        arrays.append(np.ascontiguousarray(arrays[-1][::2, ::2]))
    return arrays


def write_layout(
    path: str | pathlib.Path,
    image: np.ndarray,
    layout: str,
    *,
    compression: str | None = None,
    tile: tuple[int, int] | None = None,
    rowsperstrip: int = 16,
    bigtiff: bool = False,
    levels: int = 3,
    channel_names: tuple[str, ...] | None = None,
) -> list[pathlib.Path]:
    """Writes `image` (H, W, C) under `path` (a file stem or folder) in `layout`; returns the file(s).

    `compression` is a tifffile name ("zlib", "adobe_deflate", "lzw", "jpeg", "zstd") or None.
    `levels` is used by the pyramid layouts only (see `pyramid_levels` for the reduced arrays).
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_channels = image.shape[-1]
    names = list(channel_names or [f"channel_{c}" for c in range(num_channels)])
    storage = dict(compression=compression)
    if tile is not None:
        storage["tile"] = tile
    else:
        storage["rowsperstrip"] = rowsperstrip
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0))  # (C, H, W)
    # RGB JPEG needs photometric RGB; everything else is written as min-is-black samples.
    interleaved_photometric = "rgb" if (compression == "jpeg" and num_channels == 3) else "minisblack"

    if layout == "per_channel":
        path.mkdir(parents=True, exist_ok=True)
        files = []
        for c, name in enumerate(names):
            file = path / f"{name}.tif"
            tifffile.imwrite(file, planes[c], bigtiff=bigtiff, photometric="minisblack", **storage)
            files.append(file)
        return files

    file = path.with_suffix(".ome.tif" if layout.startswith("ome") else ".tif")
    if layout == "interleaved":
        tifffile.imwrite(file, image, bigtiff=bigtiff, photometric=interleaved_photometric,
                         planarconfig="contig", **storage)
    elif layout == "planar":
        tifffile.imwrite(file, planes, bigtiff=bigtiff, photometric="minisblack",
                         planarconfig="separate", **storage)
    elif layout == "multipage":
        tifffile.imwrite(file, planes, bigtiff=bigtiff, photometric="minisblack",
                         metadata={"axes": "QYX"}, **storage)
    elif layout == "multipage_plain":
        with tifffile.TiffWriter(file, bigtiff=bigtiff) as writer:
            for plane in planes:
                writer.write(plane, photometric="minisblack", metadata=None, **storage)
    elif layout == "imagej":
        tifffile.imwrite(file, planes, imagej=True, photometric="minisblack",
                         metadata={"axes": "CYX"}, **storage)
    elif layout == "ome":
        tifffile.imwrite(file, planes, bigtiff=bigtiff, ome=True, photometric="minisblack",
                         metadata={"axes": "CYX", "Channel": {"Name": names}}, **storage)
    elif layout == "ome_pyramid":
        arrays = pyramid_levels(image, levels)
        with tifffile.TiffWriter(file, bigtiff=bigtiff, ome=True) as writer:
            writer.write(planes, subifds=levels - 1, photometric="minisblack",
                         metadata={"axes": "CYX", "Channel": {"Name": names}}, **storage)
            for reduced in arrays[1:]:
                writer.write(np.ascontiguousarray(np.moveaxis(reduced, -1, 0)), subfiletype=1,
                             photometric="minisblack", **storage)
    elif layout == "subifd_pyramid":
        arrays = pyramid_levels(image, levels)
        with tifffile.TiffWriter(file, bigtiff=bigtiff) as writer:
            writer.write(image, subifds=levels - 1, photometric=interleaved_photometric,
                         planarconfig="contig", **storage)
            for reduced in arrays[1:]:
                writer.write(reduced, subfiletype=1, photometric=interleaved_photometric,
                             planarconfig="contig", **storage)
    return [file]


def write_with_corrupt_tile(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A copy of the TIFF `source` whose middle compressed chunk of page 0 is overwritten: the header
    reads fine, only decoding that chunk's pixels fails."""
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages[0]
        middle = len(page.dataoffsets) // 2
        offset, length = page.dataoffsets[middle], page.databytecounts[middle]
    data[offset:offset + length] = b"\xff" * length
    target.write_bytes(bytes(data))
    return target


# Small test slides: sizes, dtypes and compressions the reader tests sweep, and a slide spec over them.
HEIGHT, WIDTH = 45, 67  # odd sizes: partial tiles / strips at the right and bottom edges
TILE = (16, 16)
DTYPES = (np.uint8, np.uint16, np.float32)
COMPRESSIONS = (None, "zlib", "adobe_deflate", "lzw", "zstd")


def random_image(dtype, shape=(HEIGHT, WIDTH, 4), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 50, shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


def write_mask(path, mask):
    tifffile.imwrite(path, mask, photometric="minisblack")
    return path


def spec_for(files, mask_file, **kw) -> SlideSpec:
    return SlideSpec(slide_id="slide_7", image_files=tuple(files), mask_file=mask_file, **kw)


def open_layout(tmp_path, image, layout, mask=None, **kw):
    files = write_layout(tmp_path / "img", image, layout, **kw)
    mask = np.zeros(image.shape[:2], np.uint8) if mask is None else mask
    return spec_for(files, write_mask(tmp_path / "mask.tif", mask))


# Aperio's ImageDescription: a header line, then "key = value" pairs separated by "|". The header says
# what each page is: level 0 "W0xH0 [0,0 W0xH0] (tile) codec", a reduced level "... -> WxH codec",
# the thumbnail "W0xH0 -> WxH - ", the label and macro "label WxH" / "macro WxH".
_APERIO_HEADER = "Aperio Image Library v12.0.5\r\n"


def write_aperio_svs(path: str | pathlib.Path, image: np.ndarray, mpp: float, *, levels: int = 3,
                     tile: tuple[int, int] = (16, 16), compression: str = "zlib",
                     label_macro: bool = True) -> pathlib.Path:
    """Writes the RGB uint8 `image` (H, W, 3) as an Aperio SVS pyramid; returns the file.

    Page order as Aperio's scanners write it: level 0 (tiled), a stripped thumbnail (every 3rd pixel),
    the reduced levels 1..levels-1 (tiled, `pyramid_levels`, NewSubfileType 0 like level 0), then,
    with `label_macro`, a label (NewSubfileType 1) and a macro image (9). Every page's description
    states `mpp` as "MPP" (level 0's microns per pixel, as Aperio does). Pixels are deflate-compressed
    (not JPEG, as Aperio's), so a test reads back exactly the written values.
    """
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    path = pathlib.Path(path)
    height, width = image.shape[:2]
    tail = (f"|AppMag = 20|StripeWidth = 2040|ScanScope ID = SS1234|Filename = 1234|Date = 12/29/09"
            f"|Time = 09:59:15|MPP = {mpp}|Left = 25.691574|Top = 23.449873|OriginalWidth = {width}"
            f"|OriginalHeight = {height}")
    base = f"{width}x{height} [0,0 {width}x{height}] ({tile[1]}x{tile[0]})"
    thumbnail = np.ascontiguousarray(image[::3, ::3])
    pages = [(image, f"{base} JPEG/RGB Q=70{tail}", tile, 0),
             (thumbnail, f"{width}x{height} -> {thumbnail.shape[1]}x{thumbnail.shape[0]} - {tail}", None, 0)]
    for reduced in pyramid_levels(image, levels)[1:]:
        pages.append((reduced, f"{base} -> {reduced.shape[1]}x{reduced.shape[0]} JPEG/RGB Q=70{tail}", tile, 0))
    if label_macro:
        label = np.full((11, 13, 3), 200, np.uint8)
        macro = np.full((9, 27, 3), 100, np.uint8)
        pages += [(label, "label 13x11", None, 1), (macro, "macro 27x9", None, 9)]
    with tifffile.TiffWriter(path) as writer:
        for data, description, page_tile, subfiletype in pages:
            writer.write(data, photometric="rgb", compression=compression, tile=page_tile,
                         description=_APERIO_HEADER + description, subfiletype=subfiletype, metadata=None)
    return path


def set_ome_pixel_size(file: str | pathlib.Path, mpp: float) -> pathlib.Path:
    """Writes PhysicalSizeX / PhysicalSizeY = `mpp` (in µm, OME's default unit) into the OME-XML of the OME-TIFF
    `file` (as `write_layout` writes it, which states no pixel size); returns the file."""
    xml = tifffile.tiffcomment(file)
    sized = xml.replace("<Pixels ", f'<Pixels PhysicalSizeX="{mpp!r}" PhysicalSizeY="{mpp!r}" ', 1)
    tifffile.tiffcomment(file, comment=sized.encode("ascii"))
    return pathlib.Path(file)


def fine_block_sums(source: np.ndarray, p: int, q: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Brute-force area sums for resampling (H, W[, C]) by s = p / q source pixels a side (float64).

    Each source pixel becomes q x q fine pixels (np.repeat); target pixel (i, j) is exactly the fine pixels
    [i*p:(i+1)*p, j*p:(j+1)*p], so its area mean is the sum over p**2. `shape` (default floor(n * q / p) per
    axis) may reach past the source: fine pixels there count as 0.
    """
    fine = np.repeat(np.repeat(np.asarray(source, np.float64), q, axis=0), q, axis=1)
    height, width = shape or (fine.shape[0] // p, fine.shape[1] // p)
    pad = [(0, max(0, height * p - fine.shape[0])), (0, max(0, width * p - fine.shape[1]))]
    fine = np.pad(fine, pad + [(0, 0)] * (fine.ndim - 2))[: height * p, : width * p]
    return fine.reshape(height, p, width, p, *fine.shape[2:]).sum(axis=(1, 3))
