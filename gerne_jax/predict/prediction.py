"""Whole-slide prediction: every slide of a manifest through a trained run -> maps, regions, metrics.

Each slide goes through the three steps of `slide_prediction` (open, scan, write). Over a manifest the
steps are pipelined (`_predict_slides`): the next slide is opened and the last one written while the
model works on the current one. Slides already finished (their `summary.json` written with the same
run, checkpoint, settings and files) are skipped.

For the whole run, `OUT/slides.csv`, `OUT/index.md` and, where masks exist, `OUT/metrics.json` (per
tau, the same `evaluate.report_per_tau` as `evaluate.py`) and `OUT/error_vs_tissue_ratio.png`; per
slide, the files of `slide_prediction.write_slide` under `OUT/slides/<slide_id>/`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.evaluation import evaluate, reports
from gerne_jax.predict import inference, slide_outputs
from gerne_jax.predict.run_data import PredictionSettings
from gerne_jax.predict.slide_prediction import (
    SLIDES_DIR,
    OpenedSlide,
    load_finished,
    open_slide,
    scan_slide,
    slide_dir,
    start_slide,
    write_slide,
)
from gerne_jax.runs import run_log
from gerne_jax.slides import tiling_report
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest


def slides_of_split(specs: Sequence[SlideSpec], data_spec: run_log.DataSpec, split: str) -> list[SlideSpec]:
    """The slides that went into `split` of the run's data (its tiling report, stored in the run's data
    spec), else those of the manifest's `split` column."""
    chosen = [spec for spec in specs if (data_spec.slide_splits.get(spec.slide_id) or spec.split) == split]
    if not chosen:
        raise InputError(f"no slide of the manifest is in the {split!r} split of the run's data (by the "
                         f"{tiling_report.FILE_NAME} splits in {data_spec.source}, or the manifest's split column)")
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
