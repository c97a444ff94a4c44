"""One slide of a manifest -> its array_record file, QC PNG and sidecar (docs/design.md §2).

`tile_slide` is what a worker process of `gerne-jax tile` (`data_pipeline.tile_manifest`)
runs for each slide:
1. open and validate the slide; a thumbnail at 1/f of the chosen level gives the detected tissue
   (`detect_tissue`) unless the manifest names a tissue mask;
2. scan the patch grid in horizontal bands of P rows, read in blocks of at most `BAND_BYTES`
   (several bands per block when rows are narrow, column chunks of one band when they are wide;
   `grid.scan_plan`), so memory stays bounded whatever the slide's size; per patch, tumour and tissue
   pixel counts come from column prefix sums, vectorised over the band, and the image is read only
   where a band keeps patches (background is not decoded). Steps 1-2 are `SlideScan`,
   which whole-slide prediction uses too, so it sees exactly the patches the tiler keeps;
3. serialise the kept patches into the slide's own array_record file under `DATA_DIR/.work/`, write
   `qc/<slide_id>.png`, and last a JSON sidecar (patch rows, channel moments, settings). The sidecar
   marks the slide finished: a re-run with the same settings and files skips it (resume).

Definitions at the chosen level (pixel (i, j); P patch size, S stride, f tissue factor):
    tissue(i, j)    = tissue_lowres[i // f, j // f] or tumour(i, j)   (lowres: detected or given mask)
    patches         top-left (k*S, l*S) with k*S + P <= H and l*S + P <= W
    label           1 if tumour pixels >= min_tumour_pixels else 0
    tumour_fraction = tumour pixels / P^2;  tissue_ratio = tissue pixels / P^2
    kept            tissue_ratio > min_tissue_ratio;  stored x, y = level coords * level_downsample

Sidecars and the tiling report store settings and patch rows under the on-disk names
(`min_tumor_pixels`, `tumor_fraction`; gerne_jax/data/dataset.py), so the work of a DATA_DIR tiled by an
earlier version still resumes.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides import qc
from gerne_jax.slides.grid import lowres_window, scan_plan, tissue_factor_for, window_counts
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tissue import detect_tissue

if TYPE_CHECKING:
    from data_pipeline.storage import AnyPath

WORK_DIR = ".work"
QC_DIR = "qc"
# Source bytes one read block may hold (see `grid.scan_plan`).
BAND_BYTES = 128 << 20
SIDECAR_VERSION = 1


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


@dataclasses.dataclass(frozen=True)
class SlideFormat:
    """What every slide of one dataset must share."""

    num_channels: int
    dtype: str
    channel_names: tuple[str, ...]
    level_downsample: int


def _shards():
    """The shard writer, imported on first use: it loads TensorFlow (Datasets), which whole-slide
    prediction (scanning slides through `SlideScan`, writing no shards) does without."""
    from data_pipeline import shards

    return shards


def slide_paths(data_dir: AnyPath, slide_id: str) -> dict[str, AnyPath]:
    """A slide's files in `data_dir` (a local folder, or a URL's `storage.RemotePath`)."""
    shards = _shards()
    work = data_dir / WORK_DIR
    return {"records": work / f"{slide_id}.{shards.SHARD_SUFFIX}", "sidecar": work / f"{slide_id}.json",
            "qc": data_dir / QC_DIR / f"{slide_id}.png"}


def config_on_disk(config: TilingConfig) -> dict[str, Any]:
    """The settings as sidecars and the tiling report store them (on-disk names, see the module doc)."""
    return dataset.to_disk(dataclasses.asdict(config))


def fingerprint(spec: SlideSpec, config: TilingConfig) -> dict[str, Any]:
    """Settings and source files (path, size, mtime) a slide's finished output depends on."""
    source_files = [*spec.image_files, *([spec.mask_file] if spec.mask_file else []),
                    *([spec.tissue_mask_file] if spec.tissue_mask_file else [])]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files]
    return {"version": SIDECAR_VERSION, "config": config_on_disk(config), "files": stats,
            "patient_id": spec.patient_id or "", "channel_names": list(spec.channel_names or [])}


def slide_format(reader: SlideReader) -> SlideFormat:
    return SlideFormat(reader.num_channels, np.dtype(reader.dtype).name, tuple(reader.channel_names),
                       int(reader.level_downsample))


def format_mismatch(spec: SlideSpec, found: SlideFormat, expected: SlideFormat) -> SlideError:
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
    """The patch grid of one opened slide and the patches it keeps, block by block.

    This is the one definition of which patches a slide yields (module docstring): the tiler
    (`tile_slide`) and whole-slide prediction (`gerne_jax.predict.prediction`) both scan through it. Opening
    detects the tissue on a thumbnail at 1/f (unless the slide has a tissue mask); `read_block` reads
    one block of `plan` (from any thread) and
    `blocks()` yields them all in order, reading one ahead. `band_bytes` bounds a block's source
    bytes; it changes the reads, never the patches.
    """

    def __init__(self, reader: SlideReader, config: TilingConfig, band_bytes: int = BAND_BYTES):
        self.reader = reader
        self.config = config
        self.factor = tissue_factor_for(reader.shape, config.tissue_factor)
        self.thumbnail = reader.thumbnail(self.factor)
        self.detected = (detect_tissue(self.thumbnail, polarity=config.tissue_polarity)
                         if reader.spec.tissue_mask_file is None else None)
        self.plan = scan_plan(reader.shape, config.patch_size, config.stride,
                              reader.num_channels * reader.dtype.itemsize, band_bytes)

    def read_block(self, block: tuple[np.ndarray, np.ndarray]) -> PatchBlock:
        """The patches of one block of `plan`: per grid row, those whose tissue ratio exceeds the minimum.

        Safe to call from several threads at once (they share the reader's cache of decoded segments).
        """
        reader = self.reader
        P, config = self.config.patch_size, self.config
        ys, xs = block
        y0, x0 = int(ys[0]), int(xs[0])
        h, w = int(ys[-1]) + P - y0, int(xs[-1]) + P - x0
        tumour = reader.read_tumour(y0, x0, h, w)
        given = reader.read_tissue_mask(y0, x0, h, w)
        tissue = (given if given is not None else lowres_window(self.detected, self.factor, y0, x0, h, w)) | tumour
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


def tile_slide(
    spec: SlideSpec,
    data_dir: pathlib.Path,
    config: TilingConfig,
    expected_format: SlideFormat,
    progress: Callable[[int], None] = lambda positions: None,
) -> dict[str, Any]:
    """Tiles one slide into its array_record file, QC PNG and sidecar; returns the sidecar dict.

    `progress(n)` is called after each band (or band chunk) with the grid positions it scanned.
    """
    paths = slide_paths(data_dir, spec.slide_id)
    for stale in paths["records"].parent.glob(f"{paths['records'].name}.tmp-*"):
        stale.unlink()  # left by a killed run
    P, shards = config.patch_size, _shards()
    with SlideReader(spec, level=config.level, downsample=config.downsample,
                     tumour_ids=config.tumour_ids) as reader:
        reader.validate()
        found = slide_format(reader)
        if found != expected_format:
            raise format_mismatch(spec, found, expected_format)
        height, width = reader.shape
        scan = SlideScan(reader, config)
        factor, thumbnail = scan.factor, scan.thumbnail
        lowres_shape = thumbnail.shape[:2]
        # QC outlines at 1/f: filled from the band scan (rows / columns that are multiples of f).
        qc_tissue = scan.detected.copy() if scan.detected is not None else np.zeros(lowres_shape, bool)
        qc_tumour = np.zeros(lowres_shape, bool)

        features = shards.patch_features(P, reader.num_channels, reader.dtype)
        serialize = shards.PatchSerializer(features)
        statistics = shards.PixelStatistics(reader.num_channels, reader.dtype)
        rows: list[dict[str, Any]] = []
        d = reader.level_downsample

        def records():
            for block in scan.blocks():
                record_qc_rows(qc_tissue, qc_tumour, block.tissue, block.tumour, block.y0, block.x0, factor)
                for band in block.bands:
                    statistics.add_windows(band.pixels, band.columns, P)
                    for i in range(band.x.size):
                        row = dataset.patch_row(spec.slide_id, spec.patient_id, int(band.x[i]) * d, band.y * d,
                                                int(band.tumour_pixels[i] >= config.min_tumour_pixels),
                                                band.tumour_pixels[i] / P**2, band.tissue_ratio[i])
                        rows.append(row)
                        yield serialize({"image": band.patch(i), **row})
                    progress(band.positions)

        with contextlib.closing(records()) as patch_records:  # stops the prefetch before the reader closes
            shards.write_array_record(paths["records"], patch_records)

    paths["qc"].parent.mkdir(parents=True, exist_ok=True)
    qc.save_qc_png(paths["qc"], thumbnail, qc_tissue, qc_tumour,
                   np.array([[r["y"] // d, r["x"] // d] for r in rows], np.int64).reshape(-1, 2),
                   np.array([r["label"] for r in rows], np.int64), P, factor,
                   f"{spec.slide_id}: {height} x {width} at level downsample {d}, tissue factor {factor}")
    sidecar = {"slide_id": spec.slide_id, "fingerprint": fingerprint(spec, config),
               "format": dataclasses.asdict(found), "tissue_factor": factor, "shape": [height, width],
               "rows": rows, "moments": statistics.moments().to_json()}
    _write_sidecar(paths["sidecar"], sidecar)
    return sidecar


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
    """Copies the chunk's pixels at rows / columns divisible by `factor` into the 1/f QC masks."""
    h, w = tumour.shape
    first_row, first_col = -(-y // factor) * factor - y, -(-x // factor) * factor - x
    rows = slice((y + first_row) // factor, (y + first_row) // factor + len(range(first_row, h, factor)))
    cols = slice((x + first_col) // factor, (x + first_col) // factor + len(range(first_col, w, factor)))
    qc_tissue[rows, cols] = tissue[first_row::factor, first_col::factor]
    qc_tumour[rows, cols] = tumour[first_row::factor, first_col::factor]


def _write_sidecar(path: pathlib.Path, sidecar: dict[str, Any]) -> None:
    rows = [dataset.to_disk(row) for row in sidecar["rows"]]
    files.write_text_atomic(path, json.dumps(dict(sidecar, rows=rows)))


def load_finished(data_dir: AnyPath, spec: SlideSpec, config: TilingConfig) -> dict[str, Any] | None:
    """The slide's sidecar (rows under code names) if it finished with the same settings and files,
    else None."""
    paths = slide_paths(data_dir, spec.slide_id)
    if not paths["sidecar"].exists() or not paths["records"].exists():
        return None
    sidecar = json.loads(paths["sidecar"].read_text())
    current = json.loads(json.dumps(fingerprint(spec, config)))  # tuples -> lists, as stored
    if sidecar.get("fingerprint") != current:
        return None
    sidecar["rows"] = [dataset.from_disk(row) for row in sidecar["rows"]]
    return sidecar
