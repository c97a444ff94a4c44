"""`gerne-jax tile`: the slides of a manifest -> a DATA_DIR of TFDS patch shards.

The DATA_DIR layout is declared in gerne_jax/data/dataset.py; the patch definitions are in docs/design.md §2
and `data_pipeline.tiling`, which tiles one slide. This module runs a whole manifest:
1. read the manifest, assign splits (`data_pipeline.splits`), and read every slide's header: the
   dataset format (channels, dtype, level downsample) comes from the first readable slide;
2. tile the slides not finished yet: by default in local worker processes (`--workers`), with
   progress bars (`slide_jobs.run_local`); with `--runner beam` as an Apache Beam pipeline
   (`data_pipeline.beam_runner`, one element per slide). Both run `slide_jobs.tile_job` per slide and
   hand its results back to one loop here, so
   validation, failures, the report and publishing are the same code whatever ran the slides.
   Finished slides (same settings and files) are resumed from their sidecars;
3. publish the finished files as the TFDS dataset (`shards.finalize_dataset`): per split, slides
   sorted by id, shard i = slide i.

Errors: a slide's SlideError stops the run before anything is published; `gerne-jax tile`
prints it as one line and exits with status 2 (`gerne_jax.core.cli.run_command`). With `--skip-errors` the
other slides finish and are published, failures are listed at the end and in `tiling_report.json`
(`gerne_jax.slides.tiling_report`),
and the exit status is still 2 when any slide failed, so scripts notice. One run at a time per
DATA_DIR: the run holds `DATA_DIR/.lock` (`files.exclusive_lock`), a second one stops at once naming
the holder, and the lock of a killed run is taken over.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import re
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import shards, storage
from data_pipeline.slide_jobs import SlideRunner, run_local
from data_pipeline.splits import assign_splits
from data_pipeline.tiling import QC_DIR, WORK_DIR, load_finished, slide_paths
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides import tiling_report
from gerne_jax.slides.grid import grid_origins
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest
from gerne_jax.slides.scan import SlideFormat, TilingConfig, format_mismatch, open_reader, slide_format

SLIDE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RUNNERS = ("local", "beam")
# Slides whose microns per pixel differ by more than this factor are called differently scaled.
MIXED_SCALE_RATIO = 1.1


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
    runner: str = "local",
    beam_options: Sequence[str] = (),
) -> dict[str, Any]:
    """Tiles every slide of `manifest` into the dataset `data_dir`; returns the report (also written
    to `tiling_report.json`). Raises SlideError on a bad slide unless `skip_errors`, and InputError
    when another run holds `data_dir` (its pid and host named) or the manifest is bad.

    `data_dir` is a local folder or a URL that fsspec writes (gs://, s3://, file://, memory://;
    `data_pipeline.storage`); the slides of the manifest are always read as local files.

    `runner` is "local" (a pool of `workers` processes) or "beam" (an Apache Beam pipeline with the
    pipeline options `beam_options`, e.g. ["--runner=DataflowRunner", ...]; without a `--runner` among
    them, Beam's DirectRunner on `workers` local processes).

    The manifest and the runner's options are checked before the lock is taken, so bad input leaves no
    output folder behind.
    """
    data_dir = storage.location(data_dir)
    if runner not in RUNNERS:
        raise InputError(f"--runner must be one of {list(RUNNERS)}, got {runner!r}")
    if beam_options and runner != "beam":
        raise InputError(f"--beam-option {list(beam_options)} needs --runner beam (the runner is {runner!r})")
    if isinstance(data_dir, storage.RemotePath) and data_dir.in_one_process and runner == "local" and workers > 1:
        raise InputError(f"--out {data_dir}: this file system lives in one process's memory, which worker "
                         "processes do not share; use --workers 1")
    run_slides = (_beam_runner().slide_runner(beam_options, workers, show_progress) if runner == "beam" else
                  functools.partial(run_local, workers=workers, show_progress=show_progress))
    specs = read_manifest(manifest)
    for spec in specs:
        if not SLIDE_ID_PATTERN.fullmatch(spec.slide_id):
            raise SlideError(spec.slide_id, manifest, "slide_id is used as a file name: use letters, "
                             "digits, '.', '_' and '-' (not starting with '.', '_' or '-')")
    split_of = assign_splits(specs, split_fractions, seed)
    # Two runs on one DATA_DIR would delete each other's temporary files and race in the finalize folder.
    # A URL has no such lock (object stores have no flock): start one run per DATA_DIR there.
    lock = (files.exclusive_lock(data_dir, "tiling") if isinstance(data_dir, pathlib.Path) else
            contextlib.nullcontext())
    with lock:
        return _tile_locked(specs, split_of, data_dir, config, run_slides, skip_errors)


def _beam_runner() -> types.ModuleType:
    """`data_pipeline.beam_runner`, imported only for `--runner beam`: apache-beam is an optional extra."""
    try:
        from data_pipeline import beam_runner
    except ModuleNotFoundError as error:
        if error.name != "apache_beam":
            raise
        raise InputError("--runner beam needs Apache Beam, which is not installed: "
                         "pip install 'gerne-jax[beam]'") from error
    return beam_runner


def _tile_locked(specs: Sequence[SlideSpec], split_of: Mapping[str, str], data_dir: storage.AnyPath,
                 config: TilingConfig, run_slides: SlideRunner, skip_errors: bool) -> dict[str, Any]:
    """`tile_manifest` once it holds the DATA_DIR's lock; `run_slides` tiles the slides left to do."""
    (data_dir / WORK_DIR).mkdir(parents=True, exist_ok=True)
    # Files half-written by a killed run (an upload, or a local write cut by SIGKILL, which no clean-up
    # survives); the lock is ours, so no other run is writing them.
    for stale in [path for folder in (data_dir, data_dir / WORK_DIR, data_dir / QC_DIR)
                  for path in folder.glob("*.tmp-*")]:
        stale.unlink()

    report: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}

    def fail(slide_id: str, error: Exception) -> None:
        failures[slide_id] = str(error)
        report[slide_id] = {"status": "failed", "split": split_of[slide_id], "error": str(error)}
        if not skip_errors:
            tiling_report.write(data_dir, config, report, storage.write_text)
            raise error

    # Header pass: the dataset format (first readable slide) and the grid sizes for the progress bar.
    expected: SlideFormat | None = None
    positions: dict[str, int] = {}
    scales: dict[str, float | None] = {}  # microns per pixel read, where the slide states its pixel size
    for spec in specs:
        try:
            with open_reader(spec, config) as reader:
                found = slide_format(reader, config)
                positions[spec.slide_id] = (len(grid_origins(reader.shape[0], config.patch_size, config.stride))
                                            * len(grid_origins(reader.shape[1], config.patch_size, config.stride)))
        except SlideError as error:
            fail(spec.slide_id, error)
            continue
        expected = expected or found
        if found != expected:
            fail(spec.slide_id, format_mismatch(spec, found, expected))
        else:
            scales[spec.slide_id] = found.mpp
    if config.mpp is None:
        _warn_mixed_scales(scales)

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
    for result in run_slides(jobs, data_dir, config, expected, sum(positions[s.slide_id] for s in jobs)):
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
    tiling_report.write(data_dir, config, report, storage.write_text)
    if sidecars:
        _publish(data_dir, sidecars, split_of, config, expected, _common_mpp(config, [scales[s] for s in sidecars]))
    return {"slides": report, "failed": sorted(failures)}


def _warn_mixed_scales(scales: Mapping[str, float | None]) -> None:
    """Warns, naming the slides, when slides tiled at one level or downsample have physical scales more than
    `MIXED_SCALE_RATIO` apart (a patch would cover different areas of tissue): `--mpp` tiles them alike."""
    known = {slide_id: mpp for slide_id, mpp in scales.items() if mpp is not None}
    if known and not _scales_agree(list(known.values())):
        listed = ", ".join(f"{slide_id} {mpp:.4g}" for slide_id, mpp in sorted(known.items(), key=lambda i: i[1]))
        warnings.warn(f"the slides are tiled at different physical scales (µm/pixel: {listed}); a patch covers "
                      "different areas of tissue on them: tile with --mpp to read every slide at one scale",
                      stacklevel=3)


def _scales_agree(mpps: Sequence[float]) -> bool:
    return max(mpps) <= MIXED_SCALE_RATIO * min(mpps)


def _common_mpp(config: TilingConfig, scales: Sequence[float | None]) -> float | None:
    """The microns per pixel of a DATA_DIR's patches: --mpp, else the slides' own where all state it and
    agree within `MIXED_SCALE_RATIO` (their median), else None."""
    if config.mpp is not None:
        return config.mpp
    if not scales or None in scales or not _scales_agree(scales):
        return None
    return float(np.median(scales))


def _publish(data_dir: storage.AnyPath, sidecars: Mapping[str, dict[str, Any]], split_of: Mapping[str, str],
             config: TilingConfig, dataset_format: SlideFormat, mpp: float | None) -> None:
    parts_by_split: dict[str, list[shards.ShardPart]] = {split: [] for split in dataset.SPLITS}
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
                "source_dtype": dataset_format.dtype, "min_tumour_pixels": config.min_tumour_pixels,
                "min_tissue_ratio": config.min_tissue_ratio, "mpp": mpp}
    sizes = shards.finalize_dataset(data_dir, parts_by_split, features, metadata)
    print("patches per split: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))


def run(args: argparse.Namespace) -> int:
    """Tiles the manifest; bad input raises InputError (one line, exit 2 under `run_command`), and so
    does a `--skip-errors` run in which any slide failed, after the others are published."""
    config = TilingConfig(
        patch_size=args.patch_size, stride=args.stride or args.patch_size, level=args.level,
        downsample=args.downsample, min_tumour_pixels=args.min_tumour_pixels,
        min_tissue_ratio=args.min_tissue_ratio, tissue_polarity=args.tissue_polarity,
        tumour_ids=tuple(args.tumour_ids) if args.tumour_ids else None,
        tissue_factor=args.tissue_factor, mpp=args.mpp, channels=args.channels,
        tumour_classes=args.tumour_classes, tissue_classes=args.tissue_classes, reader=args.reader)
    out = storage.location(args.out)
    report = tile_manifest(args.manifest, out, config, workers=args.workers,
                           skip_errors=args.skip_errors, split_fractions=args.split_fractions,
                           seed=args.seed, runner=args.runner, beam_options=args.beam_options)
    failed, total = len(report["failed"]), len(report["slides"])
    if failed == total:
        raise InputError(f"every slide of {str(args.manifest)!r} failed (listed above and in "
                         f"{str(out / tiling_report.FILE_NAME)!r}); nothing is published")
    if failed:
        raise InputError(f"{failed} of {total} slide(s) of {str(args.manifest)!r} failed and are left out "
                         f"(listed above and in {str(out / tiling_report.FILE_NAME)!r}); the others are published")
    return 0
