"""`python -m data_pipeline tile`: slides of a manifest -> TFDS patch shards (see contracts.md).

Per slide (one worker process each, `--workers`):
1. open and validate the slide; a thumbnail at 1/f of the chosen level gives the detected tissue
   (`detect_tissue`) unless the manifest names a tissue mask;
2. scan the patch grid in horizontal bands of P rows, read in blocks of at most `BAND_BYTES`
   (several bands per block when rows are narrow, column chunks of one band when they are wide), so
   memory stays bounded whatever the slide's size; per patch, tumour and tissue pixel counts come
   from column prefix sums, vectorised over the band;
3. serialise the kept patches into the slide's own array_record file under `DATA_DIR/.work/`, write
   `qc/<slide_id>.png`, and last a JSON sidecar (patch rows, channel moments, settings). The sidecar
   marks the slide finished: a re-run with the same settings and files skips it (resume).
Then the finished files are published as the TFDS dataset (`shards.finalize_dataset`): per split,
slides sorted by id, shard i = slide i.

Definitions at the chosen level (pixel (i, j); P patch size, S stride, f tissue factor):
    tissue(i, j)   = tissue_lowres[i // f, j // f] or tumour(i, j)   (lowres: detected or given mask)
    patches        top-left (k*S, l*S) with k*S + P <= H and l*S + P <= W
    label          1 if tumour pixels >= min_tumor_pixels else 0
    tumor_fraction = tumour pixels / P^2;  tissue_ratio = tissue pixels / P^2
    kept           tissue_ratio > min_tissue_ratio;  stored x, y = level coords * level_downsample

Errors: a slide's SlideError stops the run before anything of that slide is published (exit 1).
With `--skip-errors` the other slides finish, failures are listed at the end and in
`tiling_report.json`, and the exit code is 0 unless every slide failed.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import queue
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline import qc, shards
from data_pipeline.slides import SlideError, SlideReader, SlideSpec, read_manifest
from data_pipeline.tissue import detect_tissue
from gerne_jax import files

WORK_DIR = ".work"
QC_DIR = "qc"
REPORT_FILE = "tiling_report.json"
# Source bytes one read block may hold (see `scan_plan`).
BAND_BYTES = 128 << 20
# Long side of the tissue-detection thumbnail when --tissue-factor is not given.
THUMBNAIL_SIDE = 2048
SLIDE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SIDECAR_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """Settings that determine a slide's patches (all of them go into the resume fingerprint)."""

    patch_size: int
    stride: int
    level: int = 0
    downsample: int | None = None
    min_tumor_pixels: int = 1
    min_tissue_ratio: float = 0.0
    tissue_polarity: str = "auto"
    tumour_ids: tuple[int, ...] | None = None
    tissue_factor: int | None = None  # None: the smallest power of 2 with max(H, W) / f <= THUMBNAIL_SIDE

    def __post_init__(self):
        if self.patch_size < 1 or self.stride < 1:
            raise ValueError(f"patch size and stride must be >= 1, got {self.patch_size}, {self.stride}")
        if not 1 <= self.min_tumor_pixels <= self.patch_size**2:
            raise ValueError(f"min_tumor_pixels must be in [1, P^2 = {self.patch_size**2}], "
                             f"got {self.min_tumor_pixels}")
        if not 0.0 <= self.min_tissue_ratio < 1.0:
            raise ValueError(f"min_tissue_ratio must be in [0, 1), got {self.min_tissue_ratio}")
        if self.tissue_factor is not None and self.tissue_factor < 1:
            raise ValueError(f"tissue_factor must be >= 1, got {self.tissue_factor}")


@dataclasses.dataclass(frozen=True)
class SlideFormat:
    """What every slide of one dataset must share."""

    num_channels: int
    dtype: str
    channel_names: tuple[str, ...]
    level_downsample: int


# ---------------------------------------------------------------------------------------------------
# Grid arithmetic (pure numpy)
# ---------------------------------------------------------------------------------------------------
def grid_origins(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Patch starts k*S with k*S + P <= length (empty if the side is shorter than P)."""
    return np.arange(0, max(length - patch_size + 1, 0), stride, dtype=np.int64)


def window_counts(band: np.ndarray, starts: np.ndarray, patch_size: int) -> np.ndarray:
    """True pixels of `band` (h, w) bool in the column windows [s, s + P) for each start s."""
    column_prefix = np.concatenate([[0], np.cumsum(band.sum(axis=0, dtype=np.int64))])
    return column_prefix[starts + patch_size] - column_prefix[starts]


def lowres_window(lowres: np.ndarray, factor: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Window [y:y+h, x:x+w] of the full-resolution mask whose pixel (i, j) is lowres[i//f, j//f]
    (the last low-res row / column extends past the mask's end)."""
    r0, c0 = y // factor, x // factor
    r1, c1 = (y + h - 1) // factor + 1, (x + w - 1) // factor + 1
    block = lowres[r0:r1, c0:c1]
    block = np.pad(block, ((0, r1 - r0 - block.shape[0]), (0, c1 - c0 - block.shape[1])), mode="edge")
    full = np.repeat(np.repeat(block, factor, axis=1), factor, axis=0)
    return full[y - r0 * factor:y - r0 * factor + h, x - c0 * factor:x - c0 * factor + w]


def group_windows(starts: np.ndarray, patch_size: int, stride: int, max_extent: int) -> list[np.ndarray]:
    """Runs of consecutive window starts whose joint extent (last + P - first) is at most
    `max_extent` (at least one start per run)."""
    per_group = max(1, (max_extent - patch_size) // stride + 1)
    return [starts[i:i + per_group] for i in range(0, len(starts), per_group)]


def scan_plan(shape: tuple[int, int], patch_size: int, stride: int, bytes_per_pixel: int,
              budget: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The blocks a slide is read in: (patch-row starts, patch-column starts) per block, in
    row-major patch order. A block holds at most `budget` source bytes where a band of P rows
    allows: whole rows of several patch rows when the width fits (fewer re-decoded TIFF tiles
    where bands cut through them), else column chunks of one band."""
    P, S = patch_size, stride
    ys, xs = grid_origins(shape[0], P, S), grid_origins(shape[1], P, S)
    x_groups = group_windows(xs, P, S, budget // (P * bytes_per_pixel))
    if len(x_groups) == 1 and S <= P:  # with S > P, several rows per block would read the gaps
        span = int(x_groups[0][-1]) + P - int(x_groups[0][0])
        y_groups = group_windows(ys, P, S, budget // (span * bytes_per_pixel))
    else:
        y_groups = [ys[i:i + 1] for i in range(len(ys))]
    return [(y_group, x_group) for y_group in y_groups for x_group in x_groups]


def tissue_factor_for(shape: tuple[int, int], config: TilingConfig) -> int:
    if config.tissue_factor is not None:
        return config.tissue_factor
    # A power of two, so a standard pyramid level can serve the thumbnail.
    return 1 << max(0, math.ceil(math.log2(max(max(shape), 1) / THUMBNAIL_SIDE)))


# ---------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------
def split_counts(num_groups: int, fractions: Sequence[float]) -> list[int]:
    """Groups per split: largest remainders of fractions * n, then every split with a positive
    fraction gets at least one group while there are enough groups (taken from the largest)."""
    raw = np.asarray(fractions, np.float64) * num_groups
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_groups - counts.sum()]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if num_groups >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts.tolist()


def assign_splits(specs: Sequence[SlideSpec], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Slide id -> split. The manifest's `split` column wins if present (then every row needs one);
    otherwise patients (a slide without patient id is its own patient) are shuffled with `seed` and
    dealt to train / validation / test by `fractions`, so a patient's slides share one split."""
    given = {spec.slide_id: spec.split for spec in specs if spec.split}
    if given:
        missing = [spec.slide_id for spec in specs if not spec.split]
        if missing:
            raise ValueError(f"manifest: the split column is empty for slide(s) {missing}; give a "
                             "split for every slide or for none")
        patients = collections.defaultdict(set)
        for spec in specs:
            if spec.patient_id:
                patients[spec.patient_id].add(spec.split)
        shared = {p: sorted(s) for p, s in patients.items() if len(s) > 1}
        if shared:
            warnings.warn(f"manifest splits put one patient in several splits: {shared}", stacklevel=2)
        return given
    if len(fractions) != len(shards.SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"--split-fractions must be 3 non-negative numbers summing to 1 "
                         f"(train validation test), got {list(fractions)}")
    groups = sorted({spec.patient_id or f"slide:{spec.slide_id}" for spec in specs})
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.cumsum(split_counts(len(groups), fractions))
    split_of_group = {groups[g]: shards.SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
                      for rank, g in enumerate(order)}
    return {spec.slide_id: split_of_group[spec.patient_id or f"slide:{spec.slide_id}"] for spec in specs}


# ---------------------------------------------------------------------------------------------------
# One slide
# ---------------------------------------------------------------------------------------------------
def slide_paths(data_dir: pathlib.Path, slide_id: str) -> dict[str, pathlib.Path]:
    work = data_dir / WORK_DIR
    return {"records": work / f"{slide_id}.{shards.SHARD_SUFFIX}", "sidecar": work / f"{slide_id}.json",
            "qc": data_dir / QC_DIR / f"{slide_id}.png"}


def fingerprint(spec: SlideSpec, config: TilingConfig) -> dict[str, Any]:
    """Settings and source files (path, size, mtime) a slide's finished output depends on."""
    source_files = list(spec.image_files) + [spec.mask_file] + ([spec.tissue_mask_file] if spec.tissue_mask_file else [])
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source_files]
    return {"version": SIDECAR_VERSION, "config": dataclasses.asdict(config), "files": stats,
            "patient_id": spec.patient_id or "", "channel_names": list(spec.channel_names or [])}


def slide_format(reader: SlideReader) -> SlideFormat:
    return SlideFormat(reader.num_channels, np.dtype(reader.dtype).name, tuple(reader.channel_names),
                       int(reader.level_downsample))


def format_mismatch(spec: SlideSpec, found: SlideFormat, expected: SlideFormat) -> SlideError:
    return SlideError(spec.slide_id, spec.image_files[0], f"does not match the dataset's format: "
                      f"{found} (expected, from the first readable slide: {expected})")


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
    P, S = config.patch_size, config.stride
    with SlideReader(spec, level=config.level, downsample=config.downsample,
                     tumour_ids=config.tumour_ids) as reader:
        reader.validate()
        found = slide_format(reader)
        if found != expected_format:
            raise format_mismatch(spec, found, expected_format)
        height, width = reader.shape
        factor = tissue_factor_for(reader.shape, config)
        thumbnail = reader.thumbnail(factor)
        lowres_shape = thumbnail.shape[:2]
        detected = (detect_tissue(thumbnail, polarity=config.tissue_polarity)
                    if spec.tissue_mask_file is None else None)
        # QC outlines at 1/f: filled from the band scan (rows / columns that are multiples of f).
        qc_tissue = detected.copy() if detected is not None else np.zeros(lowres_shape, bool)
        qc_tumour = np.zeros(lowres_shape, bool)

        features = shards.patch_features(P, reader.num_channels, reader.dtype)
        serialize = shards.PatchSerializer(features)
        statistics = shards.PixelStatistics(reader.num_channels, reader.dtype)
        rows: list[dict[str, Any]] = []
        d = reader.level_downsample
        plan = scan_plan(reader.shape, P, S, reader.num_channels * reader.dtype.itemsize, BAND_BYTES)

        def read_block(block: tuple[np.ndarray, np.ndarray]):
            ys, xs = block
            y0, x0 = int(ys[0]), int(xs[0])
            h, w = int(ys[-1]) + P - y0, int(xs[-1]) + P - x0
            image = reader.read_region(y0, x0, h, w)
            tumour = reader.read_tumour(y0, x0, h, w)
            given = reader.read_tissue_mask(y0, x0, h, w)
            tissue = (given if given is not None else lowres_window(detected, factor, y0, x0, h, w)) | tumour
            return y0, x0, image, tumour, tissue

        def records():
            for (ys, xs), (y0, x0, image, tumour, tissue) in _prefetched(read_block, plan):
                _record_qc_rows(qc_tissue, qc_tumour, tissue, tumour, y0, x0, factor)
                local = xs - x0
                for y in ys.tolist():
                    band = slice(y - y0, y - y0 + P)
                    tumour_pixels = window_counts(tumour[band], local, P)
                    tissue_ratio = window_counts(tissue[band], local, P) / P**2
                    kept = np.flatnonzero(tissue_ratio > config.min_tissue_ratio)
                    statistics.add_windows(image[band], local[kept], P)
                    for i in kept:
                        row = shards.patch_row(spec.slide_id, spec.patient_id, int(xs[i]) * d, y * d,
                                               int(tumour_pixels[i] >= config.min_tumor_pixels),
                                               tumour_pixels[i] / P**2, tissue_ratio[i])
                        rows.append(row)
                        yield serialize({"image": image[band, local[i]:local[i] + P], **row})
                    progress(len(xs))

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
    files.write_text_atomic(paths["sidecar"], json.dumps(sidecar))
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


def _record_qc_rows(qc_tissue: np.ndarray, qc_tumour: np.ndarray, tissue: np.ndarray,
                    tumour: np.ndarray, y: int, x: int, factor: int) -> None:
    """Copies the chunk's pixels at rows / columns divisible by `factor` into the 1/f QC masks."""
    h, w = tumour.shape
    first_row, first_col = -(-y // factor) * factor - y, -(-x // factor) * factor - x
    rows = slice((y + first_row) // factor, (y + first_row) // factor + len(range(first_row, h, factor)))
    cols = slice((x + first_col) // factor, (x + first_col) // factor + len(range(first_col, w, factor)))
    qc_tissue[rows, cols] = tissue[first_row::factor, first_col::factor]
    qc_tumour[rows, cols] = tumour[first_row::factor, first_col::factor]


def load_finished(data_dir: pathlib.Path, spec: SlideSpec, config: TilingConfig) -> dict[str, Any] | None:
    """The slide's sidecar if it finished with the same settings and files, else None."""
    paths = slide_paths(data_dir, spec.slide_id)
    if not paths["sidecar"].exists() or not paths["records"].exists():
        return None
    sidecar = json.loads(paths["sidecar"].read_text())
    current = json.loads(json.dumps(fingerprint(spec, config)))  # tuples -> lists, as stored
    return sidecar if sidecar.get("fingerprint") == current else None


# ---------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------
class _QueueProgress:
    """Picklable progress callback of a worker process: sends counts to the parent's queue."""

    def __init__(self, progress_queue):
        self.progress_queue = progress_queue

    def __call__(self, positions: int) -> None:
        self.progress_queue.put(positions)


def _tile_job(spec: SlideSpec, data_dir: pathlib.Path, config: TilingConfig, expected: SlideFormat,
              progress: Callable[[int], None]) -> dict[str, Any]:
    """Runs `tile_slide` and turns its failure into a result, so the parent decides what to do."""
    try:
        sidecar = tile_slide(spec, data_dir, config, expected, progress)
    except SlideError as error:
        return {"slide_id": spec.slide_id, "status": "failed", "error": str(error), "exception": error}
    except Exception as error:  # noqa: BLE001 - reported, and re-raised without --skip-errors
        return {"slide_id": spec.slide_id, "status": "failed", "error": f"{type(error).__name__}: {error}",
                "exception": RuntimeError(f"slide {spec.slide_id!r}: unexpected error\n"
                                          f"{traceback.format_exc()}")}
    return {"slide_id": spec.slide_id, "status": "tiled", "sidecar": sidecar}


def _run_jobs(jobs: Sequence[SlideSpec], data_dir: pathlib.Path, config: TilingConfig,
              expected: SlideFormat, workers: int, total_positions: int, show_progress: bool):
    """Yields one result per job as slides finish, with progress bars. Closing the generator (the
    caller stopping on an error) cancels the slides not started yet."""
    slide_bar = tqdm(total=len(jobs), desc="slides", unit="slide", position=0, disable=not show_progress)
    patch_bar = tqdm(total=total_positions, desc="grid positions", unit="pos", position=1,
                     disable=not show_progress, smoothing=0.05)
    try:
        if workers == 1 or len(jobs) <= 1:
            for spec in jobs:
                result = _tile_job(spec, data_dir, config, expected, patch_bar.update)
                slide_bar.update()
                yield result
            return
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=context) as executor:
            progress_queue = manager.Queue()
            pending = set()
            try:
                pending = {executor.submit(_tile_job, spec, data_dir, config, expected,
                                           _QueueProgress(progress_queue)) for spec in jobs}
                while pending:
                    done, pending = concurrent.futures.wait(
                        pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
                    _drain(progress_queue, patch_bar)
                    for future in done:
                        slide_bar.update()
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        patch_bar.close()
        slide_bar.close()


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


# ---------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------
def tile_manifest(
    manifest: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: TilingConfig,
    *,
    workers: int = 1,
    skip_errors: bool = False,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tiles every slide of `manifest` into the dataset `data_dir`; returns the report (also written
    to `tiling_report.json`). Raises SlideError on a bad slide unless `skip_errors`."""
    data_dir = pathlib.Path(data_dir)
    specs = read_manifest(manifest)
    for spec in specs:
        if not SLIDE_ID_PATTERN.fullmatch(spec.slide_id):
            raise SlideError(spec.slide_id, manifest, "slide_id is used as a file name: use letters, "
                             "digits, '.', '_' and '-' (not starting with '.', '_' or '-')")
    split_of = assign_splits(specs, split_fractions, seed)
    (data_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)

    report: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}

    def fail(slide_id: str, error: Exception) -> None:
        failures[slide_id] = str(error)
        report[slide_id] = {"status": "failed", "split": split_of[slide_id], "error": str(error)}
        if not skip_errors:
            _write_report(data_dir, report, config)
            raise error

    # Header pass: the dataset format (first readable slide) and the grid sizes for the progress bar.
    expected: SlideFormat | None = None
    positions: dict[str, int] = {}
    for spec in specs:
        try:
            with SlideReader(spec, level=config.level, downsample=config.downsample,
                             tumour_ids=config.tumour_ids) as reader:
                found = slide_format(reader)
                positions[spec.slide_id] = (len(grid_origins(reader.shape[0], config.patch_size, config.stride))
                                            * len(grid_origins(reader.shape[1], config.patch_size, config.stride)))
        except SlideError as error:
            fail(spec.slide_id, error)
            continue
        expected = expected or found
        if found != expected:
            fail(spec.slide_id, format_mismatch(spec, found, expected))

    sidecars: dict[str, dict[str, Any]] = {}
    jobs = []
    for spec in specs:
        if spec.slide_id in failures:
            continue
        finished = load_finished(data_dir, spec, config)
        if finished is not None:
            sidecars[spec.slide_id] = finished
            report[spec.slide_id] = {"status": "resumed"}
        else:
            jobs.append(spec)
    if sidecars:
        print(f"resuming: {len(sidecars)} slide(s) already tiled, {len(jobs)} to go")
    for result in _run_jobs(jobs, data_dir, config, expected, workers,
                            sum(positions[s.slide_id] for s in jobs), show_progress):
        if result["status"] == "failed":
            fail(result["slide_id"], result["exception"])
        else:
            sidecars[result["slide_id"]] = result["sidecar"]
            report[result["slide_id"]] = {"status": "tiled"}

    for slide_id, sidecar in sidecars.items():
        labels = np.array([r["label"] for r in sidecar["rows"]], np.int64)
        report[slide_id].update(split=split_of[slide_id], patches=len(labels),
                                tumour_patches=int(labels.sum()), non_tumour_patches=int((labels == 0).sum()))
        if not len(labels):
            height, width = sidecar["shape"]
            warnings.warn(f"slide {slide_id!r}: no patch kept ({height} x {width} pixels at the tiled "
                          f"level, patch size {config.patch_size}, tissue ratio must exceed "
                          f"{config.min_tissue_ratio}); nothing of it is in the dataset", stacklevel=2)
    if failures:
        print(f"{len(failures)} slide(s) failed and were skipped:", file=sys.stderr)
        for message in failures.values():
            print(f"  {message}", file=sys.stderr)
    _write_report(data_dir, report, config)
    if sidecars:
        _publish(data_dir, sidecars, split_of, config, expected)
    return {"slides": report, "failed": sorted(failures)}


def _publish(data_dir: pathlib.Path, sidecars: Mapping[str, dict[str, Any]], split_of: Mapping[str, str],
             config: TilingConfig, dataset_format: SlideFormat) -> None:
    parts_by_split: dict[str, list[shards.ShardPart]] = {split: [] for split in shards.SPLITS}
    for slide_id in sorted(sidecars):
        sidecar = sidecars[slide_id]
        parts_by_split[split_of[slide_id]].append(shards.ShardPart(
            slide_paths(data_dir, slide_id)["records"], sidecar["rows"],
            shards.ChannelMoments.from_json(sidecar["moments"])))
    for split, parts in parts_by_split.items():
        if not any(part.rows for part in parts):
            warnings.warn(f"split {split!r} has no patches; it is left out of the dataset", stacklevel=2)
    features = shards.patch_features(config.patch_size, dataset_format.num_channels, dataset_format.dtype)
    metadata = {"channel_names": list(dataset_format.channel_names), "patch_size": config.patch_size,
                "stride": config.stride, "level": config.level,
                "level_downsample": dataset_format.level_downsample,
                "source_dtype": dataset_format.dtype, "min_tumor_pixels": config.min_tumor_pixels,
                "min_tissue_ratio": config.min_tissue_ratio}
    sizes = shards.finalize_dataset(data_dir, parts_by_split, features, metadata)
    print("patches per split: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))


def _write_report(data_dir: pathlib.Path, report: Mapping[str, Any], config: TilingConfig) -> None:
    content = {"config": dataclasses.asdict(config), "slides": dict(sorted(report.items()))}
    files.write_text_atomic(data_dir / REPORT_FILE, json.dumps(content, indent=2))


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=pathlib.Path, help="slide manifest CSV")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output dataset folder (DATA_DIR)")
    parser.add_argument("--patch-size", required=True, type=_positive_int, help="patch side P in pixels")
    parser.add_argument("--stride", type=_positive_int, default=None, help="grid stride S (default P)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level to tile")
    parser.add_argument("--downsample", type=_positive_int, default=None,
                        help="tile at this downsample of level 0 (pyramid level or area mean)")
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
    parser.add_argument("--skip-errors", action="store_true",
                        help="skip broken slides and report them (exit 0 unless every slide failed)")
    parser.add_argument("--min-tumor-pixels", type=_positive_int, default=1,
                        help="tumour pixels that make a patch label 1")
    parser.add_argument("--min-tissue-ratio", type=float, default=0.0,
                        help="keep patches whose tissue ratio is above this")
    parser.add_argument("--tissue-polarity", choices=("auto", "dark", "bright"), default="auto",
                        help="background of the tissue detection")
    parser.add_argument("--tissue-factor", type=_positive_int, default=None,
                        help=f"tissue detection at 1/F of the tiled level (default: the smallest power "
                             f"of 2 giving a long side <= {THUMBNAIL_SIDE} px)")
    parser.add_argument("--tumour-ids", type=int, nargs="+", default=None,
                        help="mask labels that are tumour (for label-map masks)")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2),
                        metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="split by patient with these fractions when the manifest has no split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")


def run(args: argparse.Namespace) -> int:
    try:
        config = TilingConfig(
            patch_size=args.patch_size, stride=args.stride or args.patch_size, level=args.level,
            downsample=args.downsample, min_tumor_pixels=args.min_tumor_pixels,
            min_tissue_ratio=args.min_tissue_ratio, tissue_polarity=args.tissue_polarity,
            tumour_ids=tuple(args.tumour_ids) if args.tumour_ids else None,
            tissue_factor=args.tissue_factor)
        report = tile_manifest(args.manifest, args.out, config, workers=args.workers,
                               skip_errors=args.skip_errors, split_fractions=args.split_fractions,
                               seed=args.seed)
    except (SlideError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if report["failed"] and len(report["failed"]) == len(report["slides"]):
        print("error: every slide failed", file=sys.stderr)
        return 1
    return 0
