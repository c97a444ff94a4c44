"""The run-level outputs of a prediction, rebuilt from what is on disk: `OUT/slides.csv`, `OUT/index.md`,
and, where slides have masks, `OUT/metrics.json` and `OUT/error_vs_tissue_ratio.png`.

`write` reads the state of every slide of the manifest from `OUT/slides/<id>/`, whichever process
predicted it: "predicted" (its `summary.json` matches this run, checkpoint, settings and files:
`slide_prediction.load_finished`), "failed" (its `failure.txt`, written by a run with `--skip-errors`,
holds the error) or "pending" (neither: not yet done by the shard that owns it). Everything is taken in
manifest order, so the files depend only on the slides' files, never on which process or shard
predicted which slide, in which order, or whether a slide was resumed: the last shard to write them
writes what one process would have written. Writers of one OUT take turns (`lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gerne_jax.core import files
from gerne_jax.evaluation import evaluate, reports
from gerne_jax.predict import inference, slide_outputs
from gerne_jax.predict.run_data import PredictionSettings
from gerne_jax.predict.slide_prediction import SLIDES_DIR, load_finished, slide_dir
from gerne_jax.slides.manifest import SlideSpec

FAILURE_FILE = "failure.txt"
LOCKS_DIR = ".locks"  # beside OUT/.lock: the locks of shards (`prediction`) and of this module's writers
SUMMARY_COLUMNS = ("patches", "tumour_patch_share", "above_threshold_share", "mean_probability", "max_probability",
                   "tumour_regions")


def record_failure(out: pathlib.Path, slide_id: str, message: str) -> None:
    """Marks a slide failed with `message` (a run with `--skip-errors`), for every shard's `write` to list."""
    folder = slide_dir(out, slide_id)
    folder.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(folder / FAILURE_FILE, message)


def clear_failure(out: pathlib.Path, slide_id: str) -> None:
    """Forgets a slide's failure: called when it is predicted again."""
    (slide_dir(out, slide_id) / FAILURE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def lock(out: pathlib.Path) -> Iterator[None]:
    """Waits for, then holds, the lock of `OUT`'s run outputs (`OUT/.locks/outputs.lock`): a shard rewriting
    them waits for another one doing so, so the later writer reads the later state of the slides."""
    path = out / LOCKS_DIR / "outputs.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield


def slide_states(out: pathlib.Path, specs: Sequence[SlideSpec], run: inference.RestoredRun,
                 settings: PredictionSettings) -> list[tuple[SlideSpec, str, Any]]:
    """`(spec, status, summary or failure message or None)` of each slide, in manifest order (module docstring)."""
    states = []
    for spec in specs:
        summary = load_finished(spec, run, settings, out)
        failure = slide_dir(out, spec.slide_id) / FAILURE_FILE
        if summary is not None:
            states.append((spec, "predicted", summary))
        elif failure.is_file():
            states.append((spec, "failed", failure.read_text()))
        else:
            states.append((spec, "pending", None))
    return states


def write(out: pathlib.Path, specs: Sequence[SlideSpec], run: inference.RestoredRun,
          settings: PredictionSettings) -> dict[str, Any]:
    """Writes the run outputs of `specs` from their states on disk (hold `lock`); returns `{"slides": rows of
    slides.csv, "pooled": per-tau metrics of the slides with masks, pooled}`."""
    states = slide_states(out, specs, run, settings)
    summaries = {spec.slide_id: summary for spec, status, summary in states if status == "predicted"}
    first_key = evaluate.tau_key(settings.taus_list[0])
    rows = []
    for spec, status, detail in states:
        row: dict[str, Any] = {"slide_id": spec.slide_id, "status": status}
        if status == "failed":
            row["error"] = detail
        elif status == "predicted":
            row.update({key: detail[key] for key in SUMMARY_COLUMNS})
            report = detail.get("results", {}).get(first_key)
            if report:
                row.update({"label_tumour_share": detail["label_tumour_share"],
                            **{f"{short} ({first_key})": report[key] for short, key in reports.SUMMARY_METRICS}})
        rows.append(row)
    slide_outputs.write_rows_csv(out / "slides.csv", rows)
    pooled = _write_metrics(out, summaries, run, settings)
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
    return {"slides": rows, "pooled": pooled}


def _write_metrics(out: pathlib.Path, summaries: dict[str, dict[str, Any]], run: inference.RestoredRun,
                   settings: PredictionSettings) -> dict[str, Any]:
    """metrics.json and the error plot of the predicted slides with masks, pooled; returns the pooled reports
    ({} when no slide has a mask: nothing is written)."""
    tables = [slide_outputs.read_patch_table(slide_dir(out, slide_id) / "patches.csv")
              for slide_id, summary in summaries.items() if summary["has_mask"] and summary["patches"]]
    if not tables:
        return {}
    label = np.concatenate([t["label"] for t in tables])
    tissue_ratio = np.concatenate([t["tissue_ratio"] for t in tables])
    probabilities = np.stack([np.concatenate([t["probability_non_tumour"] for t in tables]),
                              np.concatenate([t["probability"] for t in tables])], axis=1)
    pooled = evaluate.report_per_tau(probabilities, label, tissue_ratio, settings.taus_list)
    reports.plot_error_by_tissue_ratio({run.workdir.name: (label, probabilities, tissue_ratio)},
                                       out / "error_vs_tissue_ratio.png",
                                       taus=sorted({t for taus in settings.taus_list for t in taus}))
    document = {"workdir": str(run.workdir), "checkpoint": run.checkpoint,
                "checkpoint_step": run.checkpoint_meta.get("step"), "slides": len(tables), "pooled": pooled,
                "per_slide": {slide_id: summary.get("results", {}) for slide_id, summary in summaries.items()
                              if summary["has_mask"]}}
    files.write_text_atomic(out / "metrics.json", json.dumps(document, indent=2, allow_nan=True))
    return pooled
