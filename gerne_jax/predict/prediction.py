"""Whole-slide prediction: every slide of a manifest through a trained run -> maps, regions, metrics.

Each slide goes through three steps. `open_slide` opens it with the run's data settings (level /
downsample, patch size, stride, tissue detection, minimum tissue ratio: the training DATA_DIR's
`tiling_report.json` and metadata as the run stored them in its data spec, `run_log.DataSpec`), checks
its channels (count, names and order), dtype and level downsample against the run's data and detects
its tissue with the tiler's own `data_pipeline.tiling.SlideScan`, so it classifies exactly the
patches the tiler would keep. `scan_slide` classifies them: a pool of reader threads (sharing the
slide's one `SlideReader` and its chunk cache) reads blocks ahead into a bounded queue, and the patches
are copied into fixed-size batches for the jitted, sharded `inference.PatchClassifier`; nothing holds
more than a few blocks of the slide. `write_slide` writes its files. Over a manifest the steps are
pipelined (`_predict_slides`): the next slide is opened and the last one written while the model works
on the current one.

Per slide, `OUT/slides/<slide_id>/`: `probability.tif`, `overlay.png`, `patches.csv`,
`regions.geojson` and last `summary.json`, which marks the slide finished: a rerun with the same run,
checkpoint, settings and files skips it, and a slide killed half-way (no summary) is redone. For the
whole run, `OUT/slides.csv`, `OUT/index.md` and, where masks exist, `OUT/metrics.json` (per tau, the
same `evaluate.report_per_tau` as `evaluate.py`) and `OUT/error_vs_tissue_ratio.png`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

from data_pipeline.tiling import SlideScan, TilingConfig, fingerprint, record_qc_rows
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate, reports
from gerne_jax.predict import inference, slide_outputs
from gerne_jax.runs import run_log
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest
from gerne_jax.slides.reader import SlideReader, placeholder_channel_names

log = logging.getLogger("predict")

SLIDES_DIR = "slides"
SUMMARY_FILE = "summary.json"
TILING_REPORT = dataset.TILING_REPORT_FILE  # written by `gerne-jax tile` beside the shards
# Source bytes one read block may hold; several are in flight (2 per reader thread).
PREDICT_BLOCK_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class PredictionSettings:
    """How slides are predicted; everything but `workers` and `batch_size` goes into the resume check."""

    tiling: TilingConfig
    threshold: float = 0.5
    taus_list: tuple[tuple[float, ...], ...] = ((0.1,),)
    batch_size: int = 256
    workers: int = 2

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")


def data_tiling_config(run: inference.RestoredRun, **overrides: Any) -> TilingConfig:
    """The tiling settings the run's data was made with, from the run's data spec: its tiling report's
    config where the DATA_DIR had one (tissue polarity, factor, tumour ids too), else its metadata's;
    `overrides` (not None) win.

    Patch size, level and downsample are the model's input and cannot be overridden.
    """
    stored, metadata = run.data_spec.tiling, run.metadata
    if stored is not None:
        stored = dict(stored, tumour_ids=tuple(stored["tumour_ids"]) if stored.get("tumour_ids") else None)
        settings = {field.name: stored[field.name] for field in dataclasses.fields(TilingConfig)
                    if field.name in stored}
    else:
        settings = {"patch_size": metadata["patch_size"], "stride": metadata["stride"],
                    "level": metadata.get("level", 0), "min_tumour_pixels": metadata["min_tumour_pixels"],
                    "min_tissue_ratio": metadata["min_tissue_ratio"]}
        if metadata.get("level_downsample", 1) > 1 and not metadata.get("level"):
            settings["downsample"] = metadata["level_downsample"]
    fixed = {"patch_size", "level", "downsample"}
    settings.update({key: value for key, value in overrides.items() if value is not None and key not in fixed})
    return TilingConfig(**settings)


def slide_dir(out: pathlib.Path, slide_id: str) -> pathlib.Path:
    return out / SLIDES_DIR / slide_id


def _run_fingerprint(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings) -> dict[str, Any]:
    return json.loads(json.dumps({
        "slide": fingerprint(spec, settings.tiling), "mask": spec.mask_file is not None,
        "workdir": str(run.workdir.absolute()), "checkpoint": run.checkpoint,
        "checkpoint_step": run.checkpoint_meta.get("step"), "threshold": settings.threshold,
        "taus": settings.taus_list}))


def check_format(spec: SlideSpec, reader: SlideReader, metadata: dict[str, Any]) -> None:
    """A slide must have the channel count, dtype and level downsample of the run's data (`metadata`, the
    run's data spec's), and its channel names in the same order where both name their channels."""
    found = (reader.num_channels, np.dtype(reader.dtype).name, int(reader.level_downsample))
    expected = (len(metadata["channel_names"]), str(metadata["source_dtype"]), int(metadata["level_downsample"]))
    if found != expected:
        raise SlideError(spec.slide_id, spec.image_files[0], f"does not match the run's data: the slide has "
                         f"{found[0]} channel(s) of {found[1]} at level downsample {found[2]}, the model was "
                         f"trained on {expected[0]} channel(s) of {expected[1]} at level downsample {expected[2]}")
    names, trained = tuple(reader.channel_names), tuple(metadata["channel_names"])
    # Placeholder names (no manifest column, no OME names) say nothing about the channels: a slide without
    # names is taken in the manifest's order, as the tiler takes it.
    placeholders = placeholder_channel_names(len(names))
    if names != trained and placeholders not in (names, trained):
        raise SlideError(spec.slide_id, spec.image_files[0], f"does not match the run's data: the slide's "
                         f"channels are {list(names)}, the model was trained on {list(trained)} (in this order)")


@dataclasses.dataclass
class OpenedSlide:
    """A slide opened, checked and with its tissue detected (`open_slide`), ready to scan; close it after."""

    spec: SlideSpec
    reader: SlideReader
    scan: SlideScan

    def close(self) -> None:
        self.reader.close()


@dataclasses.dataclass
class ScannedSlide:
    """What the scan of one slide found (`scan_slide`): everything `write_slide` needs, no open file."""

    spec: SlideSpec
    shape: tuple[int, int]
    level_downsample: int
    factor: int
    thumbnail: np.ndarray
    qc_tissue: np.ndarray
    qc_tumour: np.ndarray
    probability_map: slide_outputs.ProbabilityMap
    probabilities: np.ndarray              # [n, K]
    fields: dict[str, np.ndarray]          # x, y (chosen level), tissue_ratio, tumour_pixels


def open_slide(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings) -> OpenedSlide:
    """Opens a slide with the run's data settings, checks its format and detects its tissue (SlideError)."""
    config = settings.tiling
    reader = SlideReader(spec, level=config.level, downsample=config.downsample, tumour_ids=config.tumour_ids)
    reader.__enter__()
    try:
        check_format(spec, reader, run.metadata)
        # The mask's values are checked block by block as the scan reads it (a label map stops the slide
        # before anything is written): decoding the whole mask up front would cost a second pass.
        reader.validate(mask_values=False)
        return OpenedSlide(spec, reader, SlideScan(reader, config, band_bytes=PREDICT_BLOCK_BYTES))
    except BaseException:
        reader.close()
        raise


def scan_slide(opened: OpenedSlide, classifier: inference.PatchClassifier, settings: PredictionSettings,
               progress: Callable[[int], None] = lambda positions: None) -> ScannedSlide:
    """Classifies every patch the scan keeps: reader threads fill a bounded queue of blocks while the model
    works on the batch before (module docstring)."""
    reader, scan, config = opened.reader, opened.scan, settings.tiling
    lowres_shape = scan.thumbnail.shape[:2]
    qc_tissue = scan.detected.copy() if scan.detected is not None else np.zeros(lowres_shape, bool)
    qc_tumour = np.zeros(lowres_shape, bool)
    probability_map = slide_outputs.ProbabilityMap(reader.shape, config.patch_size, config.stride)

    # One reader for every reader thread: its cache of decoded segments decodes a TIFF tile row that
    # two blocks share once, not once per thread (a thread needing a segment another decodes waits).
    def read(block):
        patches = scan.read_block(block)
        record_qc_rows(qc_tissue, qc_tumour, patches.tissue, patches.tumour, patches.y0, patches.x0, scan.factor)
        bands = patches.bands
        # Views into the read rows: `rebatch` copies each patch once, straight into its batch.
        images = [band.patch(i) for band in bands for i in range(band.x.size)]
        fields = {"x": np.concatenate([band.x for band in bands]),
                  "y": np.concatenate([np.full(band.x.size, band.y, np.int64) for band in bands]),
                  "tissue_ratio": np.concatenate([band.tissue_ratio for band in bands]),
                  "tumour_pixels": np.concatenate([band.tumour_pixels for band in bands])}
        return images, fields, sum(band.positions for band in bands)

    def chunks():
        for images, fields, positions in inference.ordered_map(read, scan.plan, settings.workers):
            progress(positions)
            yield images, fields

    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for probabilities, fields in inference.predict_batches(
            classifier, inference.rebatch(chunks(), classifier.batch_size, buffers=inference.PIPELINE_DEPTH)):
        probability_map.add(fields["y"], fields["x"], probabilities[:, 1])
        parts.append((probabilities, fields))
    probabilities = (np.concatenate([p for p, _ in parts]) if parts
                     else np.zeros((0, len(dataset.CLASS_NAMES)), np.float32))
    joined = {name: np.concatenate([f[name] for _, f in parts]) if parts else np.zeros(0)
              for name in ("x", "y", "tissue_ratio", "tumour_pixels")}
    if not parts:
        warnings.warn(f"slide {opened.spec.slide_id!r}: no patch to classify ({reader.shape[0]} x {reader.shape[1]} "
                      f"pixels at level downsample {reader.level_downsample}, patch size {config.patch_size}, "
                      f"tissue ratio must exceed {config.min_tissue_ratio}); its map is empty", stacklevel=2)
    return ScannedSlide(opened.spec, reader.shape, reader.level_downsample, scan.factor, scan.thumbnail,
                        qc_tissue, qc_tumour, probability_map, probabilities, joined)


def write_slide(scanned: ScannedSlide, run: inference.RestoredRun, settings: PredictionSettings,
                out: pathlib.Path) -> dict[str, Any]:
    """Writes one scanned slide's files (module docstring), `summary.json` last; returns the summary."""
    spec, config, d = scanned.spec, settings.tiling, scanned.level_downsample
    P, folder = config.patch_size, slide_dir(out, spec.slide_id)
    has_mask = spec.mask_file is not None
    probabilities, fields = scanned.probabilities, scanned.fields
    table = {"x": fields["x"].astype(np.int64) * d, "y": fields["y"].astype(np.int64) * d,
             "tissue_ratio": fields["tissue_ratio"].astype(np.float32),
             "probability": probabilities[:, 1], "probability_non_tumour": probabilities[:, 0],
             "prediction": probabilities.argmax(axis=1).astype(np.int32)}
    if has_mask:
        table["label"] = (fields["tumour_pixels"] >= config.min_tumour_pixels).astype(np.int32)
        table["tumour_fraction"] = (fields["tumour_pixels"] / P**2).astype(np.float32)
    count = int(probabilities.shape[0])

    probability_map = scanned.probability_map
    values, scale = probability_map.values(), probability_map.cell * d
    slide_outputs.write_patch_table(folder / "patches.csv", spec.slide_id, table)
    slide_outputs.write_map_tiff(folder / "probability.tif", values, scale, {
        "slide_id": spec.slide_id, "level_downsample": d, "patch_size": P, "stride": config.stride,
        "level0_origin": [0, 0], "values": "mean tumour probability of the patches covering the pixel, "
                                           "NaN where no patch was classified"})
    regions = slide_outputs.tumour_regions(values, settings.threshold, scale)
    slide_outputs.write_geojson(folder / "regions.geojson", regions)
    tumour_share = float(np.mean(table["prediction"] == 1)) if count else float("nan")
    title = (f"{spec.slide_id}: {count} patches, {tumour_share:.1%} predicted tumour"
             if count else f"{spec.slide_id}: no patch with tissue")
    slide_outputs.save_overlay(folder / "overlay.png", scanned.thumbnail, scanned.factor, scanned.qc_tissue,
                               scanned.qc_tumour if has_mask else None, values, probability_map.cell,
                               f"{title} (run {run.workdir.name}, {run.checkpoint})")
    summary = {
        "slide_id": spec.slide_id, "shape": list(scanned.shape), "level_downsample": d, "patches": count,
        "tumour_patch_share": tumour_share,
        "above_threshold_share": float(np.mean(table["probability"] >= settings.threshold)) if count else float("nan"),
        "mean_probability": float(np.mean(table["probability"])) if count else float("nan"),
        "max_probability": float(np.max(table["probability"])) if count else float("nan"),
        "tumour_regions": len(regions["features"]), "map_scale": scale, "has_mask": has_mask,
        "fingerprint": _run_fingerprint(spec, run, settings),
    }
    if has_mask:
        summary["label_tumour_share"] = float(np.mean(table["label"])) if count else float("nan")
        summary["results"] = (evaluate.report_per_tau(probabilities, table["label"], table["tissue_ratio"],
                                                        settings.taus_list) if count else {})
    files.write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=True))
    return summary


def start_slide(spec: SlideSpec, out: pathlib.Path) -> None:
    """Marks a slide unfinished (its summary removed) and removes what a killed run left half-written."""
    folder = slide_dir(out, spec.slide_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY_FILE).unlink(missing_ok=True)  # a rerun of a changed slide: not finished until the end
    for stale in folder.glob("*.tmp-*"):
        stale.unlink()


def load_finished(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings,
                  out: pathlib.Path) -> dict[str, Any] | None:
    """The slide's summary if it was predicted with the same run, checkpoint, settings and files."""
    path = slide_dir(out, spec.slide_id) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("fingerprint") == _run_fingerprint(spec, run, settings) else None


def slides_of_split(specs: Sequence[SlideSpec], data_spec: run_log.DataSpec, split: str) -> list[SlideSpec]:
    """The slides that went into `split` of the run's data (its tiling report, stored in the run's data
    spec), else those of the manifest's `split` column."""
    chosen = [spec for spec in specs if (data_spec.slide_splits.get(spec.slide_id) or spec.split) == split]
    if not chosen:
        raise InputError(f"no slide of the manifest is in the {split!r} split of the run's data (by the "
                         f"{TILING_REPORT} splits in {data_spec.source}, or the manifest's split column)")
    return chosen


def predict_manifest(run: inference.RestoredRun, manifest: str | os.PathLike, out: str | os.PathLike,
                     settings: PredictionSettings, *, split: str | None = None, skip_errors: bool = False,
                     show_progress: bool = True) -> dict[str, Any]:
    """Predicts every slide of `manifest` (or those of `split`, `slides_of_split`) into `out` (module
    docstring); returns the run's summary.

    A broken slide raises its SlideError, unless `skip_errors`: then the others finish and the failures
    are listed in `slides.csv` and the returned dict. One prediction per `out` at a time (`out/.lock`).
    """
    out = pathlib.Path(out)
    specs = read_manifest(manifest, require_mask=False)
    if split is not None:
        specs = slides_of_split(specs, run.data_spec, split)
    classifier = inference.PatchClassifier.from_run(run, settings.batch_size)
    with files.exclusive_lock(out, "prediction"):
        summaries: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        statuses: dict[str, str] = {}
        todo = []
        for spec in specs:
            finished = load_finished(spec, run, settings, out)
            if finished is None:
                todo.append(spec)
            else:
                summaries[spec.slide_id], statuses[spec.slide_id] = finished, "resumed"
        if len(todo) < len(specs):
            print(f"resuming: {len(specs) - len(todo)} slide(s) already predicted, {len(todo)} to go")
        slide_bar = tqdm.tqdm(total=len(todo), desc="slides", unit="slide", position=0, disable=not show_progress)
        patch_bar = tqdm.tqdm(desc="grid positions", unit="pos", position=1, disable=not show_progress,
                              smoothing=0.05)

        try:
            _predict_slides(todo, run, classifier, settings, out, skip_errors, summaries, statuses, failures,
                            slide_bar, patch_bar)
        finally:
            patch_bar.close()
            slide_bar.close()
        result = _write_run_outputs(out, specs, summaries, statuses, failures, run, settings)
    if failures:
        print(f"{len(failures)} slide(s) failed and were skipped:", file=sys.stderr)
        for message in failures.values():
            print(f"  {message}", file=sys.stderr)
    return result


def _predict_slides(todo: Sequence[SlideSpec], run: inference.RestoredRun, classifier: inference.PatchClassifier,
                    settings: PredictionSettings, out: pathlib.Path, skip_errors: bool,
                    summaries: dict[str, dict[str, Any]], statuses: dict[str, str], failures: dict[str, str],
                    slide_bar: tqdm.tqdm, patch_bar: tqdm.tqdm) -> None:
    """Opens, scans and writes every slide of `todo`, pipelined: while slide k is scanned (the model's
    time), slide k + 1 is opened (thumbnail, tissue detection) on one thread and slide k - 1 written
    (tables, map, overlay) on another, so the model does not wait for a slide's fixed costs. Each slide's
    summary is still written last; an error stops the run after the slide being written is finished."""

    def opening(spec: SlideSpec) -> OpenedSlide:
        start_slide(spec, out)
        return open_slide(spec, run, settings)

    def finish(spec: SlideSpec, summary: concurrent.futures.Future) -> None:
        summaries[spec.slide_id], statuses[spec.slide_id] = summary.result(), "predicted"
        slide_bar.update()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="open-slide") as opener, \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="write-slide") as writer:
        upcoming = opener.submit(opening, todo[0]) if todo else None
        writing = None  # (spec, future summary) of the slide being written
        try:
            for k, spec in enumerate(todo):
                slide_bar.set_postfix_str(spec.slide_id)
                current = upcoming
                upcoming = opener.submit(opening, todo[k + 1]) if k + 1 < len(todo) else None
                try:
                    opened = current.result()
                    try:
                        scanned = scan_slide(opened, classifier, settings, patch_bar.update)
                    finally:
                        opened.close()
                except SlideError as error:
                    if not skip_errors:
                        raise
                    failures[spec.slide_id], statuses[spec.slide_id] = str(error), "failed"
                    slide_bar.update()
                    continue
                if writing is not None:
                    finish(*writing)
                writing = (spec, writer.submit(write_slide, scanned, run, settings, out))
            if writing is not None:
                finish(*writing)
        finally:
            if upcoming is not None and not upcoming.cancel():  # opened ahead of a run that stopped
                try:
                    upcoming.result().close()
                except BaseException:  # noqa: BLE001 - its own error is not this run's
                    pass


def _write_run_outputs(out: pathlib.Path, specs: Sequence[SlideSpec], summaries: dict[str, dict[str, Any]],
                       statuses: dict[str, str], failures: dict[str, str], run: inference.RestoredRun,
                       settings: PredictionSettings) -> dict[str, Any]:
    """slides.csv, metrics.json and the error plot (slides with masks, pooled) and index.md."""
    first_key = evaluate.tau_key(settings.taus_list[0])
    rows = []
    for spec in specs:
        summary = summaries.get(spec.slide_id)
        row: dict[str, Any] = {"slide_id": spec.slide_id, "status": statuses[spec.slide_id]}
        if summary is None:
            row["error"] = failures.get(spec.slide_id, "")
        else:
            row.update({key: summary[key] for key in ("patches", "tumour_patch_share", "above_threshold_share",
                                                      "mean_probability", "max_probability", "tumour_regions")})
            report = summary.get("results", {}).get(first_key)
            if report:
                row.update({"label_tumour_share": summary["label_tumour_share"],
                            **{f"{short} ({first_key})": report[key] for short, key in reports.SUMMARY_METRICS}})
        rows.append(row)
    slide_outputs.write_rows_csv(out / "slides.csv", rows)

    pooled: dict[str, Any] = {}
    tables = [slide_outputs.read_patch_table(slide_dir(out, slide_id) / "patches.csv")
              for slide_id, summary in summaries.items() if summary["has_mask"] and summary["patches"]]
    if tables:
        label = np.concatenate([t["label"] for t in tables])
        tissue_ratio = np.concatenate([t["tissue_ratio"] for t in tables])
        probabilities = np.stack([np.concatenate([t["probability_non_tumour"] for t in tables]),
                                  np.concatenate([t["probability"] for t in tables])], axis=1)
        pooled = evaluate.report_per_tau(probabilities, label, tissue_ratio, settings.taus_list)
        reports.plot_error_by_tissue_ratio({run.workdir.name: (label, probabilities, tissue_ratio)},
                                           out / "error_vs_tissue_ratio.png",
                                           taus=sorted({t for taus in settings.taus_list for t in taus}))
        document = {"workdir": str(run.workdir), "checkpoint": run.checkpoint,
                    "checkpoint_step": run.checkpoint_meta.get("step"), "slides": len(tables),
                    "pooled": pooled, "per_slide": {slide_id: summary.get("results", {})
                                                    for slide_id, summary in summaries.items()
                                                    if summary["has_mask"]}}
        files.write_text_atomic(out / "metrics.json", json.dumps(document, indent=2, allow_nan=True))
    columns = [c for c in ("slide_id", "status", "patches", "tumour_patch_share", "mean_probability",
                           "max_probability", "tumour_regions", f"WGA ({first_key})", f"BCA ({first_key})",
                           f"AUROC ({first_key})") if any(c in row for row in rows)]
    overlays = {slide_id: f"{SLIDES_DIR}/{slide_id}/overlay.png" for slide_id in summaries}
    preamble = (f"Run `{run.workdir}`, checkpoint `{run.checkpoint}` (step {run.checkpoint_meta.get('step')}); "
                f"patch size {settings.tiling.patch_size}, stride {settings.tiling.stride}, "
                f"regions at probability >= {settings.threshold:g}.")
    if pooled:
        preamble += "\n\nPooled over the slides with masks:\n\n```\n" + reports.group_table(pooled[first_key]) + "\n```"
    slide_outputs.markdown_index(out / "index.md", "Whole-slide prediction", rows, columns, overlays, preamble)
    return {"slides": rows, "pooled": pooled, "failed": sorted(failures)}
