"""One slide of a manifest -> its array_record file, QC PNG and sidecar (docs/design.md §2).

`tile_slide` is what a worker of `gerne-jax tile` (`data_pipeline.tile_manifest`) runs for each slide:
1. open and validate the slide and scan its patch grid (`gerne_jax.slides.scan.SlideScan`, which
   whole-slide prediction uses too and whose docstring defines the patches, labels and ratios);
2. serialise the kept patches into the slide's own array_record file under `DATA_DIR/.work/`, write
   `qc/<slide_id>.png`, and last a JSON sidecar (patch rows, channel moments, settings). The sidecar
   marks the slide finished: a re-run with the same settings and files skips it (resume,
   `load_finished`).

Sidecars store settings and patch rows under the on-disk names (`min_tumor_pixels`, `tumor_fraction`;
gerne_jax/data/dataset.py), so the work of a DATA_DIR tiled by an earlier version still resumes, unless
the patch definitions changed since (`scan.SIDECAR_VERSION`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipeline import shards
from data_pipeline.storage import AnyPath
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.slides import qc
from gerne_jax.slides.manifest import SlideSpec
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.scan import (
    SlideFormat,
    SlideScan,
    TilingConfig,
    fingerprint,
    format_mismatch,
    level0,
    open_reader,
    record_qc_rows,
    slide_format,
)

WORK_DIR = ".work"
QC_DIR = "qc"


def slide_paths(data_dir: AnyPath, slide_id: str) -> dict[str, AnyPath]:
    """A slide's files in `data_dir` (a local folder, or a URL's `storage.RemotePath`)."""
    work = data_dir / WORK_DIR
    return {"records": work / f"{slide_id}.{shards.SHARD_SUFFIX}", "sidecar": work / f"{slide_id}.json",
            "qc": data_dir / QC_DIR / f"{slide_id}.png"}


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
    P = config.patch_size
    with open_reader(spec, config) as reader:
        reader.validate()
        found = slide_format(reader, config)
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
        grid_yx: list[tuple[int, int]] = []  # patch origins in pixels read, for the QC image
        scale = reader.scale

        def records():
            for block in scan.blocks():
                record_qc_rows(qc_tissue, qc_tumour, block.tissue, block.tumour, block.y0, block.x0, factor)
                for band in block.bands:
                    statistics.add_windows(band.pixels, band.columns, P)
                    xs, y = level0(band.x, scale), int(level0(band.y, scale))
                    for i in range(band.x.size):
                        row = dataset.patch_row(spec.slide_id, spec.patient_id, int(xs[i]), y,
                                                int(band.tumour_pixels[i] >= config.min_tumour_pixels),
                                                band.tumour_pixels[i] / P**2, band.tissue_ratio[i])
                        rows.append(row)
                        grid_yx.append((band.y, int(band.x[i])))
                        yield serialize({"image": band.patch(i), **row})
                    progress(band.positions)

        with contextlib.closing(records()) as patch_records:  # stops the prefetch before the reader closes
            shards.write_array_record(paths["records"], patch_records)

    paths["qc"].parent.mkdir(parents=True, exist_ok=True)
    qc.save_qc_png(paths["qc"], thumbnail, qc_tissue, qc_tumour,
                   np.array(grid_yx, np.int64).reshape(-1, 2),
                   np.array([r["label"] for r in rows], np.int64), P, factor,
                   f"{spec.slide_id}: {height} x {width} at {_scale_text(reader)}, tissue factor {factor}")
    sidecar = {"slide_id": spec.slide_id, "fingerprint": fingerprint(spec, config),
               "format": dataclasses.asdict(found), "tissue_factor": factor, "shape": [height, width],
               "rows": rows, "moments": statistics.moments().to_json()}
    _write_sidecar(paths["sidecar"], sidecar)
    return sidecar


def _scale_text(reader: SlideReader) -> str:
    """How the scale of a slide's pixels read is named in titles."""
    if reader.scale != reader.level_downsample:
        return f"{reader.mpp:.4g} µm/pixel (level-0 pixels x {reader.scale:.4g})"
    mpp = f", {reader.mpp:.4g} µm/pixel" if reader.mpp is not None else ""
    return f"level downsample {reader.level_downsample}{mpp}"


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
