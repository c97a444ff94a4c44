"""Which patches a slide yields: the tiling settings and the scan that tiling and prediction share.

`SlideScan` is the one definition of a slide's patches: the tiler (`data_pipeline.tiling.tile_slide`)
and whole-slide prediction (`gerne_jax.predict.slide_prediction`) both scan through it, so prediction
sees exactly the patches the tiler keeps:
1. a thumbnail at 1/f of the chosen level gives the detected tissue (`detect_tissue`) unless the
   manifest names a tissue mask (or `--tissue-classes` name the annotations that are tissue);
2. the patch grid is scanned in horizontal bands of P rows, read in blocks of at most `BAND_BYTES`
   (several bands per block when rows are narrow, column chunks of one band when they are wide;
   `grid.scan_plan`), so memory stays bounded whatever the slide's size; per patch, tumour and tissue
   pixel counts come from column prefix sums, vectorised over the band, and the image is read only
   where a band keeps patches (background is not decoded).

Definitions at the chosen level (pixel (i, j); P patch size, S stride, f tissue factor):
    tissue(i, j)    = given(i, j) with a tissue mask or tissue classes, else detected[i // f, j // f]
    patches         top-left (k*S, l*S) with k*S + P <= H and l*S + P <= W
    label           1 if tumour pixels >= min_tumour_pixels else 0
    tumour_fraction = tumour pixels / P^2;  tissue_ratio = tissue pixels / P^2
    kept            tissue_ratio > min_tissue_ratio;  stored x, y = rint(level coords * scale), level-0 pixels
(the chosen level: a pyramid level, an area-mean downsample, or the grid resampled to `--mpp`;
`reader.scale` level-0 pixels per pixel, the level downsample unless resampled).
Which patches are kept, and their tissue ratios, never depend on the tumour mask: a selection that
depended on the label would itself be a cue (a lone blob in an empty patch would be tumour). So a slide
scanned with or without its mask, or with another mask, yields the same patches; only label and
tumour_fraction differ. Tumour that detection misses yields no patch (a tissue mask or tissue classes
include it), and a tumour patch's tissue ratio may be below its tumour fraction.

Besides the scan: `TilingConfig` (the settings), `SlideFormat` (what every slide of a dataset shares)
and `fingerprint` (what a slide's finished output depends on, for resuming a tiling or a prediction).
Settings are stored under the on-disk names (`min_tumor_pixels`; gerne_jax/data/dataset.py), the settings
added later only when set, so adding a setting does not redo finished work; `SIDECAR_VERSION` changes
when the definitions above do, and then it is redone.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides import image_files, physical
from gerne_jax.slides.grid import lowres_window, scan_plan, tissue_factor_for, window_counts
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tissue import MAX_HOLE_UM2, MIN_OBJECT_UM2, detect_tissue

# Source bytes one read block may hold (see `grid.scan_plan`).
BAND_BYTES = 128 << 20
# The version of `fingerprint`: a tiler sidecar or prediction summary of another version is redone.
# 2: tissue no longer includes tumour pixels (version 1 kept patches by tissue | tumour).
SIDECAR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """Settings that determine a slide's patches (all of them go into the resume fingerprint)."""

    patch_size: int
    stride: int
    level: int = 0
    downsample: int | None = None
    min_tumour_pixels: int = 1
    min_tissue_ratio: float = 0.0
    tissue_polarity: str = "auto"
    tumour_ids: tuple[int, ...] | None = None
    tissue_factor: int | None = None  # None: `grid.tissue_factor_for` picks it from the slide's size
    # Added later; left out of the on-disk form while at their defaults (`config_on_disk`).
    mpp: float | None = None                       # tile at this many microns per pixel
    channels: tuple[str, ...] | None = None        # these channels, by name, in this order
    tumour_classes: tuple[str, ...] | None = None  # QuPath classes of annotations that are tumour
    tissue_classes: tuple[str, ...] | None = None  # ... and that are tissue
    reader: str = "auto"                           # image backend (`image_files.BACKENDS`)

    def __post_init__(self):
        """Rejects impossible settings before any slide is read; the message names the option."""
        if self.patch_size < 1 or self.stride < 1:
            raise InputError(f"--patch-size and --stride must be >= 1, got {self.patch_size}, {self.stride}")
        if not 1 <= self.min_tumour_pixels <= self.patch_size**2:
            raise InputError(f"--min-tumour-pixels must be in [1, P^2 = {self.patch_size**2}], "
                             f"got {self.min_tumour_pixels}")
        if not 0.0 <= self.min_tissue_ratio < 1.0:
            raise InputError(f"--min-tissue-ratio must be in [0, 1), got {self.min_tissue_ratio}")
        if self.tissue_factor is not None and self.tissue_factor < 1:
            raise InputError(f"--tissue-factor must be >= 1, got {self.tissue_factor}")
        if self.level < 0:
            raise InputError(f"--level must be >= 0, got {self.level}")
        if self.downsample is not None and (self.downsample < 1 or self.level != 0):
            raise InputError(f"--downsample must be >= 1 and excludes --level, got --downsample "
                             f"{self.downsample} --level {self.level}")
        if self.mpp is not None:
            physical.check_mpp(self.mpp, "--mpp")
            if self.level != 0 or self.downsample is not None:
                raise InputError(f"--mpp excludes --level and --downsample, got --mpp {self.mpp} --level "
                                 f"{self.level} --downsample {self.downsample}")
        for option, names in (("--channels", self.channels), ("--tumour-classes", self.tumour_classes),
                              ("--tissue-classes", self.tissue_classes)):
            if names is not None and (not names or len(set(names)) != len(names) or not all(names)):
                raise InputError(f"{option} must list distinct non-empty names, got {list(names)}")
        image_files.backend_for(pathlib.Path(), self.reader)  # checks the name


@dataclasses.dataclass(frozen=True)
class SlideFormat:
    """What every slide of one dataset must share: at a level or downsample its level downsample, at
    microns per pixel (`level_downsample` None) the mpp. `mpp` is the microns per pixel read where the
    slide states its pixel size; only at microns per pixel does it take part in the comparison."""

    num_channels: int
    dtype: str
    channel_names: tuple[str, ...]
    level_downsample: int | None
    mpp: float | None = dataclasses.field(default=None, compare=False)


def config_on_disk(config: TilingConfig) -> dict[str, Any]:
    """The settings as sidecars and the tiling report store them (on-disk names, see the module doc); the
    settings added later are left out while at their defaults, so a DATA_DIR tiled before them resumes."""
    later = {"mpp": None, "channels": None, "tumour_classes": None, "tissue_classes": None, "reader": "auto"}
    settings = {key: value for key, value in dataclasses.asdict(config).items()
                if key not in later or value != later[key]}
    return dataset.to_disk(settings)


def open_reader(spec: SlideSpec, config: TilingConfig) -> SlideReader:
    """A reader of `spec` at the scale, channels and labels of `config` (enter it to open the files)."""
    return SlideReader(spec, level=config.level, downsample=config.downsample, tumour_ids=config.tumour_ids,
                       mpp=config.mpp, channels=config.channels, tumour_classes=config.tumour_classes,
                       tissue_classes=config.tissue_classes, backend=config.reader)


def fingerprint(spec: SlideSpec, config: TilingConfig) -> dict[str, Any]:
    """Settings and source files (path, size, mtime) a slide's finished output depends on."""
    source_files = [*spec.image_files, *([spec.mask_file] if spec.mask_file else []),
                    *([spec.tissue_mask_file] if spec.tissue_mask_file else []),
                    *([spec.annotations_file] if spec.annotations_file else [])]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files]
    document = {"version": SIDECAR_VERSION, "config": config_on_disk(config), "files": stats,
                "patient_id": spec.patient_id or "", "channel_names": list(spec.channel_names or [])}
    if spec.mpp is not None:
        document["mpp"] = spec.mpp
    return document


def slide_format(reader: SlideReader, config: TilingConfig) -> SlideFormat:
    """The format of an opened slide, as `SlideFormat` compares it."""
    at_mpp = config.mpp is not None
    return SlideFormat(reader.num_channels, np.dtype(reader.dtype).name, tuple(reader.channel_names),
                       None if at_mpp else int(reader.level_downsample),
                       config.mpp if at_mpp else reader.mpp)


def level0(coordinates: np.ndarray | int, scale: float) -> np.ndarray:
    """Coordinates in pixels read -> level-0 pixels (rounded to the nearest where the scale is not whole)."""
    return np.rint(np.asarray(coordinates, np.float64) * scale).astype(np.int64)


def format_mismatch(spec: SlideSpec, found: SlideFormat, expected: SlideFormat) -> SlideError:
    """The error of a slide whose format is not the dataset's."""
    return SlideError(spec.slide_id, spec.image_files[0], f"does not match the dataset's format: "
                      f"{found} (expected, from the first readable slide: {expected})")


@dataclasses.dataclass(frozen=True)
class PatchBand:
    """Kept patches of one grid row within a read block (chosen-level pixels): all of them, or one run of
    them that a wide gap separates from the next."""

    y: int                     # top edge of the row's patches
    x: np.ndarray              # left edges of the kept patches [n]
    columns: np.ndarray        # their first column in `pixels` [n]
    pixels: np.ndarray         # rows y .. y + P from the band's first to its last patch, (P, w, C), source dtype
    tumour_pixels: np.ndarray  # [n] int64
    tissue_ratio: np.ndarray   # [n] float64
    positions: int             # grid positions of the row scanned, kept or not (0 for a row's later runs)

    def patch(self, i: int) -> np.ndarray:
        """Patch i as a (P, P, C) view of `pixels`."""
        P = self.pixels.shape[0]
        return self.pixels[:, self.columns[i]:self.columns[i] + P]


@dataclasses.dataclass(frozen=True)
class PatchBlock:
    """One read block: its origin, tissue and tumour pixels (chosen level) and its grid rows."""

    y0: int
    x0: int
    tissue: np.ndarray         # (h, w) bool
    tumour: np.ndarray         # (h, w) bool
    bands: list[PatchBand]


class SlideScan:
    """The patch grid of one opened slide and the patches it keeps, block by block (module docstring).

    Opening detects the tissue on a thumbnail at 1/f (unless the slide has a tissue mask); `read_block`
    reads one block of `plan` (from any thread) and `blocks()` yields them all in order, reading one
    ahead. `band_bytes` (default `BAND_BYTES`) bounds a block's source bytes; it changes the reads,
    never the patches.
    """

    def __init__(self, reader: SlideReader, config: TilingConfig, band_bytes: int | None = None):
        self.reader = reader
        self.config = config
        self.factor = tissue_factor_for(reader.shape, config.tissue_factor)
        self.thumbnail = reader.thumbnail(self.factor)
        self.detected = (detect_tissue(self.thumbnail, polarity=config.tissue_polarity,
                                       **physical_cleanup(reader.mpp, self.factor))
                         if not reader.has_tissue_mask else None)
        self.plan = scan_plan(reader.shape, config.patch_size, config.stride,
                              reader.num_channels * reader.dtype.itemsize,
                              BAND_BYTES if band_bytes is None else band_bytes)

    def read_block(self, block: tuple[np.ndarray, np.ndarray]) -> PatchBlock:
        """The patches of one block of `plan`: per grid row, those whose tissue ratio exceeds the minimum
        (tissue alone; the tumour mask gives only their tumour pixels).

        Safe to call from several threads at once (they share the reader's cache of decoded segments).
        """
        reader = self.reader
        P, config = self.config.patch_size, self.config
        ys, xs = block
        y0, x0 = int(ys[0]), int(xs[0])
        h, w = int(ys[-1]) + P - y0, int(xs[-1]) + P - x0
        tumour = reader.read_tumour(y0, x0, h, w)
        given = reader.read_tissue_mask(y0, x0, h, w)
        # Tissue alone, never tumour: which patches exist must not depend on the label (module docstring).
        tissue = given if given is not None else lowres_window(self.detected, self.factor, y0, x0, h, w)
        local = xs - x0
        bands = []
        for y in ys.tolist():
            rows = slice(y - y0, y - y0 + P)
            tumour_pixels = window_counts(tumour[rows], local, P)
            tissue_ratio = window_counts(tissue[rows], local, P) / P**2
            kept = np.flatnonzero(tissue_ratio > config.min_tissue_ratio)
            bands += self._read_row(y, x0, xs, local, kept, tumour_pixels[kept], tissue_ratio[kept])
        return PatchBlock(y0, x0, tissue, tumour, bands)

    def _read_row(self, y: int, x0: int, xs: np.ndarray, local: np.ndarray, kept: np.ndarray,
                  tumour_pixels: np.ndarray, tissue_ratio: np.ndarray) -> list[PatchBand]:
        """The kept patches of one grid row as bands of adjacent runs, each read from its first to its
        last patch: the masks decide first, so background, and a gap between kept patches wide enough
        to hold a whole storage chunk, is never decoded. The row's grid positions count in its first band."""
        P, reader = self.config.patch_size, self.reader
        if not kept.size:
            return [PatchBand(y, xs[kept], local[kept], np.empty((P, 0, reader.num_channels), reader.dtype),
                              tumour_pixels, tissue_ratio, len(xs))]
        columns = local[kept]
        runs = np.split(np.arange(kept.size), np.flatnonzero(np.diff(columns) - P >= reader.chunk_shape[1]) + 1)
        bands = []
        for i, run in enumerate(runs):
            left, right = int(columns[run[0]]), int(columns[run[-1]]) + P
            pixels = reader.read_region(y, x0 + left, P, right - left)
            bands.append(PatchBand(y, xs[kept][run], columns[run] - left, pixels, tumour_pixels[run],
                                   tissue_ratio[run], len(xs) if i == 0 else 0))
        return bands

    def blocks(self) -> Iterator[PatchBlock]:
        """Every block of `plan` in order, the next one read in a thread meanwhile."""
        for _, block in _prefetched(self.read_block, self.plan):
            yield block


def physical_cleanup(mpp: float | None, factor: int) -> dict[str, int]:
    """Tissue clean-up sizes in thumbnail pixels from areas in µm² (`tissue.MIN_OBJECT_UM2`,
    `tissue.MAX_HOLE_UM2`) where the pixels read are `mpp` µm; {} (fractions of the thumbnail) where the
    slide's pixel size is unknown."""
    if mpp is None:
        return {}
    pixel_area = (mpp * factor) ** 2  # µm² per thumbnail pixel
    return {"min_object_px": int(MIN_OBJECT_UM2 / pixel_area), "max_hole_px": int(MAX_HOLE_UM2 / pixel_area)}


def _prefetched(read: Callable[[Any], Any], items: Sequence[Any]):
    """Yields (item, read(item)) in order, reading the next item in a thread meanwhile, so the
    decoding of block k + 1 overlaps the serialisation of block k (one read in flight at a time)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as thread:
        upcoming = thread.submit(read, items[0]) if items else None
        for k, item in enumerate(items):
            current = upcoming.result()
            upcoming = thread.submit(read, items[k + 1]) if k + 1 < len(items) else None
            yield item, current


def record_qc_rows(qc_tissue: np.ndarray, qc_tumour: np.ndarray, tissue: np.ndarray,
                   tumour: np.ndarray, y: int, x: int, factor: int) -> None:
    """Copies the block's pixels at rows / columns divisible by `factor` into the 1/f QC masks."""
    h, w = tumour.shape
    first_row, first_col = -(-y // factor) * factor - y, -(-x // factor) * factor - x
    rows = slice((y + first_row) // factor, (y + first_row) // factor + len(range(first_row, h, factor)))
    cols = slice((x + first_col) // factor, (x + first_col) // factor + len(range(first_col, w, factor)))
    qc_tissue[rows, cols] = tissue[first_row::factor, first_col::factor]
    qc_tumour[rows, cols] = tumour[first_row::factor, first_col::factor]
