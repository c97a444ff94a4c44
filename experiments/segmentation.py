"""The segmentation question (issue 29, point 5): does the tissue-size shortcut carry over to pixel-wise
segmentation?

  python -m experiments.segmentation --data-dir DATA --manifest MANIFEST --root OUT \
      [--classifier-runs RUN ...] [--seeds 0 1 2] [--steps 1500] [--split test] [--set KEY=VALUE,...]

DATA is a DATA_DIR of `gerne-jax tile` (with its tiling report) and MANIFEST the slide manifest it was tiled
from (image and mask columns); the tumour masks are read through the package's slide reader at the
DATA_DIR's scale (`gerne_jax.slides.mask_crops`), so masks and patches align pixel for pixel. Every figure
is on the split `--split` (default test) of DATA's slides; groups are (label, tissue-ratio bin at tau).

(a) Patch classifiers scored as segmentations. Each `--classifier-runs` folder (a trained run, e.g. of
    experiments/comparison.py, on the same DATA) predicts the split's slides whole at stride P/2 through
    the package's prediction (`prediction.predict_slides`, as `gerne-jax predict --stride P/2`; its
    `best_wga` checkpoint, chosen on validation), into `OUT/classifiers/<run>/predict`. Each slide's
    probability map (`slide_outputs.ProbabilityMap`: cells of P/2 pixels, each the mean of the up to four
    patches covering it) is thresholded at 0.5 and upsampled (nearest) to the slide's pixels. The run's own
    patch metrics on the split (`evaluate.evaluate_run`) are reported beside it.
(b) A pixel-wise model (`gerne_jax.models.segmentation`: the classifiers' tiny ResNet, GroupNorm, and a
    light pyramid head), trained per seed with ERM and with GERNE batches (experiments/segmentation_model.py:
    the classifiers' sampler, optimiser and budget, `configs/demo.py`'s GERNE: c = 0.5, beta = 0.5; `--set` changes
    them, e.g. `c=1,beta=0,lr=0.03`), into `OUT/seg/<method>_seed<S>`. The step is chosen on validation
    WGA of the patch labels the segmentation implies. On the split, the per-pixel probabilities of the
    split's patches are put back on their slides (mean over patches covering a pixel) and scored like (a);
    the implied patch labels -- a patch is tumour when at least `min_tumour_pixels` of its pixels are
    predicted tumour (the data's own rule, from its metadata), and also with the count threshold chosen on
    validation BCA (stated) -- are scored with the package's metrics (per-group accuracy, WGA, BCA).

Pixel scores (`slide_scores`), over the scored area: the pixels of the split's slides that some patch
covers (tiled tissue; tumour outside every patch is not scored, but counts as missed in component recall):
- Dice `2 TP / (2 TP + FP + FN)` and IoU `TP / (TP + FP + FN)` of the tumour pixels, pooled over slides;
- the pixel error rate per class of the true pixel and per tissue-ratio bin (width 0.1) of the pixel's
  patch windows (mean tissue ratio of the patches covering it: those whose probabilities made its value),
  with pixel counts; the PNG's 95 % Clopper-Pearson intervals treat pixels as independent, which they are
  not (neighbours err together): they are far too narrow and only say where counts are small;
- tumour-component recall: the connected components of the true mask (`scipy.ndimage.label`, 4-connected)
  by area (µm² from the DATA_DIR's microns per pixel, else pixels) in half-decade bins: per bin the
  component count, the share detected (any pixel predicted tumour) and the mean share of their pixels found.

Outputs in OUT: `results.md` (per method and seed, then mean ± std over seeds; the pixel errors by tissue
ratio and the component recall pooled over seeds), `results.json`, `pixel_error_vs_tissue_ratio.png` and
`component_recall.png`. Resumable: predicted slides, finished runs (a killed run resumes from its last
evaluation) and scored entries (`result.json` in each folder) are reused.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from experiments import grid, segmentation_model
from experiments.tables import markdown_table, over_seeds
from gerne_jax.core import config_utils, files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate, reports
from gerne_jax.predict import inference, prediction, run_data, slide_outputs, slide_prediction
from gerne_jax.slides import mask_crops

RATIO_BINS = 10
THRESHOLD = 0.5  # probability at which a pixel is called tumour
RESULT_FILE = "result.json"
SCALE_KEYS = ("patch_size", "level", "level_downsample", "mpp")  # a classifier run must share DATA's


# -- pixel scores -------------------------------------------------------------------------------------------
def slide_scores(truth: np.ndarray, probability: np.ndarray, ratio: np.ndarray, pixel_area: float) -> dict[str, Any]:
    """One slide's pixel counts: `truth` `[H, W]` bool, `probability` `[H, W]` (NaN where not scored), `ratio`
    `[H, W]` the tissue ratio of each pixel's patch windows, `pixel_area` the area of a pixel (module docstring)."""
    scored = ~np.isnan(probability)
    predicted = np.nan_to_num(probability, nan=0.0) >= THRESHOLD
    true, found = truth[scored].astype(np.int64), predicted[scored]
    confusion = np.bincount(true * 2 + found, minlength=4).reshape(2, 2)
    _, counts, rates = reports.error_rate_by_tissue_ratio(true, np.stack([~found, found], axis=1), ratio[scored],
                                                          RATIO_BINS)
    components, number = ndimage.label(truth)
    sizes = np.bincount(components.ravel(), minlength=number + 1)[1:]
    hits = np.bincount(components.ravel(), weights=predicted.ravel(), minlength=number + 1)[1:]
    return {"confusion": confusion, "ratio_counts": counts, "ratio_errors": np.rint(np.nan_to_num(rates) * counts),
            "component_area": sizes * pixel_area, "component_recall": hits / np.maximum(sizes, 1)}


def pooled(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Slides' (or seeds') `slide_scores` together: counts summed, components concatenated."""
    total = {key: np.sum([np.asarray(s[key]) for s in scores], axis=0)
             for key in ("confusion", "ratio_counts", "ratio_errors")}
    for key in ("component_area", "component_recall"):
        total[key] = np.concatenate([np.asarray(s[key], np.float64) for s in scores])
    return total


def overlap(confusion: np.ndarray) -> dict[str, float]:
    """Dice, IoU and the pixel error rate of a `[truth, prediction]` confusion table."""
    (tn, fp), (fn, tp) = np.asarray(confusion, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"Dice": float(2 * tp / (2 * tp + fp + fn)), "IoU": float(tp / (tp + fp + fn)),
                "pixel error": float((fp + fn) / (tn + fp + fn + tp))}


def component_edges(areas: np.ndarray) -> np.ndarray:
    """Half-decade bin edges covering every component area."""
    areas = np.asarray(areas, np.float64)
    if not areas.size:
        return np.array([1.0, 10.0 ** 0.5])
    low, high = np.floor(2 * np.log10(areas.min())), np.ceil(2 * np.log10(areas.max())) + 1
    return 10.0 ** (np.arange(low, max(high, low + 2)) / 2)


def component_recall(areas: np.ndarray, recall: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Per area bin `[edges[i], edges[i + 1])`: components, share detected, mean share of pixels found."""
    bins = np.digitize(areas, edges) - 1
    count = np.bincount(bins, minlength=edges.size - 1)[:edges.size - 1]
    detected = np.bincount(bins, weights=np.asarray(recall) > 0, minlength=edges.size - 1)[:edges.size - 1]
    found = np.bincount(bins, weights=recall, minlength=edges.size - 1)[:edges.size - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "detected": detected / count, "pixel recall": found / count}


def upsampled(cells: np.ndarray, cell: int, shape: tuple[int, int]) -> np.ndarray:
    """A map of `cell` x `cell` pixel cells at the pixels of a `shape` level (nearest), cropped or NaN-padded."""
    pixels = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:shape[0], :shape[1]]
    return np.pad(pixels, [(0, shape[0] - pixels.shape[0]), (0, shape[1] - pixels.shape[1])],
                  constant_values=np.nan)


def patch_mean_map(shape: tuple[int, int], y: np.ndarray, x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per pixel, the mean of `values` `[n, P, P]` over the patches with top-left corners (y, x) that cover it;
    NaN where none does."""
    size = values.shape[1]
    total, count = np.zeros(shape), np.zeros(shape, np.int32)
    for i, (top, left) in enumerate(zip(y, x)):
        total[top:top + size, left:left + size] += values[i]
        count[top:top + size, left:left + size] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def pixel_area(metadata: Mapping[str, Any]) -> tuple[float, str]:
    """The area of a pixel of the tiled level and its unit: µm² where the data's mpp is known, else pixels."""
    return (float(metadata["mpp"]) ** 2, "µm²") if metadata.get("mpp") else (1.0, "pixels")


# -- (a) classifiers ----------------------------------------------------------------------------------------
def split_slides(data_dir: pathlib.Path, manifest: pathlib.Path, split: str) -> dict[str, Any]:
    """The manifest's rows of the split's slides (those with patches in DATA), by slide id."""
    table = dataset.read_patch_table(data_dir, split)
    return mask_crops.slide_specs(manifest, list(dict.fromkeys(table["slide_id"])))


def classifier_entry(run_dir: pathlib.Path, data_dir: pathlib.Path, manifest: pathlib.Path, split: str,
                     out: pathlib.Path, taus: Sequence[float]) -> dict[str, Any]:
    """A classifier run's pixel scores (its maps at stride P/2) and its own patch report on the split."""
    run = inference.load_run(run_dir, "best_wga")
    metadata = dataset.read_metadata(data_dir)
    if any(run.metadata.get(key) != metadata.get(key) for key in SCALE_KEYS):
        raise InputError(f"classifier run {run_dir} was trained on patches of another size or scale than "
                         f"{data_dir} ({SCALE_KEYS}: {[run.metadata.get(k) for k in SCALE_KEYS]} against "
                         f"{[metadata.get(k) for k in SCALE_KEYS]})")
    patch = int(metadata["patch_size"])
    if patch % 2:
        raise InputError(f"prediction at stride P/2 needs an even patch size, got {patch}")
    settings = run_data.PredictionSettings(tiling=run_data.data_tiling_config(run, stride=patch // 2),
                                           taus_list=(tuple(taus),), batch_size=run.config.data.eval_batch_size)
    specs = split_slides(data_dir, manifest, split)
    prediction.predict_slides(run, list(specs.values()), out / "predict", settings)
    config, area = mask_crops.data_tiling(data_dir), pixel_area(metadata)[0]
    scores = []
    for slide_id, spec in specs.items():
        table = slide_outputs.read_patch_table(slide_prediction.slide_dir(out / "predict", slide_id) / "patches.csv")
        with mask_crops.open_reader(spec, config) as reader:
            truth = mask_crops.level_mask(reader)
            y, x = (mask_crops.level_coordinates(table[k], reader.scale) for k in ("y", "x"))
        maps = {}
        for name in ("probability", "tissue_ratio"):
            cells = slide_outputs.ProbabilityMap(truth.shape, patch, patch // 2)
            cells.add(y, x, table[name])
            maps[name] = upsampled(cells.values(), cells.cell, truth.shape)
        scores.append(slide_scores(truth, maps["probability"], maps["tissue_ratio"], area))
    evaluation = evaluate.evaluate_run(run_dir, "best_wga", split, data_dir=str(data_dir), taus_list=[tuple(taus)])
    (report,) = evaluation.reports.values()
    return {"pixels": pooled(scores), "step": int(run.checkpoint_meta["step"]), "patches": report}


# -- (b) the pixel-wise model --------------------------------------------------------------------------------
def segmentation_entry(workdir: pathlib.Path, config: Any, data: segmentation_model.StudyData,
                       data_dir: pathlib.Path, manifest: pathlib.Path, split: str) -> dict[str, Any]:
    """A finished run's pixel scores (its patches put back on their slides) and its derived patch reports."""
    result = segmentation_model.evaluate_run(workdir, config, data, split)
    table, metadata = data.splits[split], data.metadata
    config_tiling, area = mask_crops.data_tiling(data_dir), pixel_area(metadata)[0]
    scores = []
    for slide_id, spec in split_slides(data_dir, manifest, split).items():
        chosen = np.flatnonzero(table["slide_id"] == slide_id)
        with mask_crops.open_reader(spec, config_tiling) as reader:
            truth = mask_crops.level_mask(reader)
            y, x = (mask_crops.level_coordinates(table[k][chosen], reader.scale) for k in ("y", "x"))
        probability = patch_mean_map(truth.shape, y, x, result["probabilities"][chosen])
        ratio = patch_mean_map(truth.shape, y, x, np.broadcast_to(
            table["tissue_ratio"][chosen, None, None], result["probabilities"][chosen].shape))
        scores.append(slide_scores(truth, probability, ratio, area))
    return {"pixels": pooled(scores), "step": result["record"]["best_step"], "patches": result["data_rule"],
            "patches (chosen threshold)": result["chosen_rule"], "chosen threshold": result["chosen_threshold"],
            "validation history": result["record"]["history"]}


# -- the study ----------------------------------------------------------------------------------------------
def _cached(folder: pathlib.Path, compute) -> dict[str, Any]:
    """`compute()`'s entry, stored as `folder/result.json` and read back from there once written."""
    path = folder / RESULT_FILE
    if path.is_file():
        return json.loads(path.read_text())
    entry = json.loads(json.dumps(compute(), default=lambda value: np.asarray(value).tolist()))
    folder.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(path, json.dumps(entry, indent=1, allow_nan=True))
    return entry


def classifier_name(run_dir: pathlib.Path) -> tuple[str, int | None]:
    """`erm_lr0.1_seed2` -> ("classifier erm_lr0.1", 2): runs of one setting are one method over seeds."""
    match = re.fullmatch(r"(.*)_seed(\d+)", run_dir.name)
    return (f"classifier {match[1]}", int(match[2])) if match else (f"classifier {run_dir.name}", None)


def segmentation_study(data_dir: str | pathlib.Path, manifest: str | pathlib.Path, root: str | pathlib.Path, *,
                       classifier_runs: Sequence[str | pathlib.Path] = (), seeds: Sequence[int] = (0, 1, 2),
                       methods: Sequence[str] = tuple(segmentation_model.METHODS), split: str = "test",
                       overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs (a) and (b) (module docstring), writes the reports into `root`; returns one entry per run."""
    data_dir, manifest, root = pathlib.Path(data_dir), pathlib.Path(manifest), pathlib.Path(root)
    config = segmentation_model.study_config(overrides or {})
    taus = tuple(config.data.taus)
    entries = []
    for run_dir in map(pathlib.Path, classifier_runs):
        name, seed = classifier_name(run_dir)
        print(f"\n=== (a) {run_dir}: whole slides at stride P/2 ===", flush=True)
        folder = root / "classifiers" / run_dir.name
        entry = _cached(folder, functools.partial(classifier_entry, run_dir, data_dir, manifest, split, folder, taus))
        entries.append({"method": name, "kind": "classifier", "seed": seed, "run": str(run_dir), **entry})
    data = None
    for method_name in methods:
        for seed in seeds:
            workdir = root / "seg" / f"{method_name}_seed{seed}"
            run_config = config_utils.with_overrides(config, {"training.seed": seed})
            segmentation_model.check_config(workdir, run_config)
            if (workdir / RESULT_FILE).is_file():
                print(f">>> {workdir.name}: finished and scored, reused", flush=True)
            else:
                data = data or segmentation_model.StudyData.load(data_dir, manifest)
                print(f"\n=== (b) {workdir.name} ===", flush=True)
                segmentation_model.train_run(workdir, method_name, run_config, data)
            entry = _cached(workdir, functools.partial(segmentation_entry, workdir, run_config, data, data_dir,
                                                       manifest, split))
            entries.append({"method": f"segmentation {method_name}", "kind": "segmentation", "seed": seed,
                            "run": str(workdir), **entry})
    write_report(entries, root, split, pixel_area(dataset.read_metadata(data_dir))[1], config,
                 {"data_dir": str(data_dir), "manifest": str(manifest)})
    return entries


# -- reports ------------------------------------------------------------------------------------------------
FIGURES = (("Dice", None), ("IoU", None), ("pixel error", None), ("patch WGA", "worst_group_accuracy"),
           ("patch BCA", "balanced_class_accuracy"))


def entry_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One run's figures: pixel overlap and the patch metrics (the derived labels' for the pixel-wise model)."""
    row = {"method": entry["method"], "seed": entry["seed"], "step": entry["step"],
           **overlap(entry["pixels"]["confusion"])}
    for name, key in FIGURES[3:]:
        row[name] = float(entry["patches"][key])
    if "chosen threshold" in entry:
        row["threshold (val BCA)"] = entry["chosen threshold"]
        for name, key in FIGURES[3:]:
            row[f"{name} (val-BCA threshold)"] = float(entry["patches (chosen threshold)"][key])
    return row


def completed(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the union of their keys (in first-seen order), "-" where a row lacks one: the
    classifiers have no count threshold."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key, "-") for key in keys} for row in rows]


def method_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method, `mean ± std` over seeds of every figure."""
    summary = []
    for method_name in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method_name]
        entry: dict[str, Any] = {"method": method_name, "seeds": len(mine)}
        for key in [k for k in mine[0] if isinstance(mine[0][k], float)]:
            mean, std = over_seeds([row.get(key, np.nan) for row in mine])
            entry[key] = f"{mean:.4f} ± {std:.4f}"
        summary.append(entry)
    return summary


def by_method(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's pixel counts pooled over its seeds."""
    return {name: pooled([e["pixels"] for e in entries if e["method"] == name])
            for name in dict.fromkeys(e["method"] for e in entries)}


def ratio_table(methods: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (method, class of the true pixel): the error rate and pixel count of every tissue-ratio bin."""
    edges = np.linspace(0.0, 1.0, RATIO_BINS + 1)
    rows = []
    for name, total in methods.items():
        for y, class_name in enumerate(dataset.CLASS_NAMES):
            row = {"method": name, "true pixel": class_name}
            for i in range(RATIO_BINS):
                count, wrong = total["ratio_counts"][y][i], total["ratio_errors"][y][i]
                row[f"[{edges[i]:.1f}, {edges[i + 1]:.1f})"] = f"{wrong / count:.3f} ({int(count)})" if count else "-"
            rows.append(row)
    return rows


def group_table(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method, each group's patch accuracy (mean over seeds) and count."""
    rows = []
    for name in dict.fromkeys(e["method"] for e in entries):
        mine = [e["patches"] for e in entries if e["method"] == name]
        row: dict[str, Any] = {"method": name}
        for y, class_name in enumerate(dataset.CLASS_NAMES):
            for a, bin_name in enumerate(mine[0]["bin_names"]):
                accuracy = np.nanmean([report["group_accuracy"][y][a] for report in mine])
                row[f"{class_name}, {bin_name}"] = f"{accuracy:.3f} (n={mine[0]['group_count'][y][a]})"
        rows.append(row)
    return rows


def recall_table(methods: Mapping[str, Mapping[str, Any]], edges: np.ndarray, unit: str) -> list[dict[str, Any]]:
    """Rows (method, area bin): components, share detected, mean pixel recall."""
    rows = []
    for name, total in methods.items():
        recall = component_recall(total["component_area"], total["component_recall"], edges)
        for i in range(edges.size - 1):
            rows.append({"method": name, f"area ({unit})": f"[{edges[i]:.3g}, {edges[i + 1]:.3g})",
                         "components": int(recall["count"][i]), "detected": float(recall["detected"][i]),
                         "pixel recall": float(recall["pixel recall"][i])})
    return rows


def plot_pixel_errors(methods: Mapping[str, Mapping[str, Any]], path: pathlib.Path) -> None:
    """Pixel error rate against the tissue ratio, one panel per true class, with counts and 95 % intervals."""
    edges = np.linspace(0.0, 1.0, RATIO_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, axes = files.new_figure(1, 2, figsize=(11, 4.4), sharey=True)
    for k, (name, total) in enumerate(methods.items()):
        counts, wrong = np.asarray(total["ratio_counts"]), np.asarray(total["ratio_errors"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = np.where(counts > 0, wrong / np.maximum(counts, 1), np.nan)
        low, high = reports.binomial_interval(wrong, counts)
        for y, axis in enumerate(axes):
            shift = centres + (k - (len(methods) - 1) / 2) * 0.01
            line, = axis.plot(shift, rates[y], marker="o", label=name)
            axis.errorbar(shift, rates[y], yerr=np.abs(np.stack([rates[y] - low[y], high[y] - rates[y]])),
                          fmt="none", ecolor=line.get_color(), capsize=2, alpha=0.6)
            if k == 0:
                for centre, count in zip(centres, counts[y]):
                    axis.annotate(f"n={int(count)}", (centre, 1.1), ha="center", va="top", fontsize=6,
                                  color="dimgrey", rotation=90)
    for y, axis in enumerate(axes):
        axis.set_title(f"true {dataset.CLASS_NAMES[y]} pixels")
        axis.set_xlabel("tissue ratio of the pixel's patch windows")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.1)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("pixel error rate (95 % interval, pixels as independent)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path)


def plot_component_recall(methods: Mapping[str, Mapping[str, Any]], edges: np.ndarray, unit: str,
                          path: pathlib.Path) -> None:
    """The share of tumour components detected against their area (log), with the component counts."""
    centres = np.sqrt(edges[:-1] * edges[1:])
    fig, axis = files.new_figure(figsize=(7, 4.4))
    for k, (name, total) in enumerate(methods.items()):
        recall = component_recall(total["component_area"], total["component_recall"], edges)
        axis.plot(centres, recall["detected"], marker="o", label=f"{name}: detected")
        axis.plot(centres, recall["pixel recall"], marker="x", linestyle="--", label=f"{name}: pixel recall")
        if k == 0:
            for centre, count in zip(centres, recall["count"]):
                axis.annotate(f"n={int(count)}", (centre, 1.1), ha="center", va="top", fontsize=6, color="dimgrey")
    axis.set_xscale("log")
    axis.set_xlabel(f"tumour component area ({unit})")
    axis.set_ylabel("share")
    axis.set_ylim(0, 1.1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6)
    fig.tight_layout()
    files.save_figure(fig, path)


def write_report(entries: Sequence[Mapping[str, Any]], root: pathlib.Path, split: str, unit: str,
                 config: Any, sources: Mapping[str, str]) -> None:
    """`results.md`, `results.json` and the two PNGs (module docstring); `sources` names the data the study
    read (the pixel-wise models' config keeps its own `data.dir`, which the study does not use)."""
    if not entries:
        raise InputError("nothing to report: give --classifier-runs or at least one seed")
    rows = [entry_row(entry) for entry in entries]
    summary = markdown_table(completed(method_summary(rows)))
    methods = by_method(entries)
    edges = component_edges(np.concatenate([np.asarray(m["component_area"]) for m in methods.values()]))
    plot_pixel_errors(methods, root / "pixel_error_vs_tissue_ratio.png")
    plot_component_recall(methods, edges, unit, root / "component_recall.png")
    files.write_text_atomic(root / "results.json", json.dumps(
        {"split": split, **sources, "config": config.to_dict(), "entries": list(entries)}, indent=1, allow_nan=True,
        default=lambda value: np.asarray(value).tolist()))
    files.write_text_atomic(root / "results.md", "\n".join([
        f"# The segmentation question: the tissue-size shortcut pixel by pixel ({split} split)", "",
        "Protocol: `experiments/segmentation.py`'s docstring. Classifiers: whole slides at stride P/2, maps "
        "thresholded at 0.5, their `best_wga` checkpoint; pixel-wise models: the step with the best validation "
        "WGA of the derived patch labels (a patch is tumour with at least `min_tumour_pixels` predicted tumour "
        "pixels; the `val-BCA threshold` columns use the count threshold chosen on validation BCA instead). "
        f"Settings of the pixel-wise models: steps {config.training.steps}, "
        f"B = {config.training.batch_per_group}, c = {config.method.c:g}, beta = {config.method.beta:g}, "
        f"lr {config.optimizer.learning_rate:g} ({config.optimizer.schedule}, {config.optimizer.warmup_steps} "
        f"warm-up steps), tau = {', '.join(f'{t:g}' for t in config.data.taus)}.", "",
        "## Per method (mean ± std over seeds)", "", summary, "",
        "## Patch accuracy per group (mean over seeds; patch counts)", "", markdown_table(group_table(entries)), "",
        "## Pixel error rate by tissue ratio of the pixel's patch windows (pooled over seeds; pixel counts)", "",
        markdown_table(ratio_table(methods)), "", "![pixel error](pixel_error_vs_tissue_ratio.png)", "",
        "## Tumour-component recall by area (pooled over seeds)", "",
        markdown_table(recall_table(methods, edges, unit)), "", "![component recall](component_recall.png)", "",
        "## Every run", "", markdown_table(completed(rows)), ""]))
    print(f"\n{summary}\n\nwrote {root / 'results.md'}, results.json and the PNGs")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=pathlib.Path, help="a DATA_DIR of `gerne-jax tile`")
    parser.add_argument("--manifest", required=True, type=pathlib.Path, help="the manifest DATA was tiled from")
    parser.add_argument("--root", required=True, type=pathlib.Path, help="folder for the runs and the results")
    parser.add_argument("--classifier-runs", nargs="*", default=[], type=pathlib.Path,
                        help="trained classifier runs on DATA, scored as segmentations")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the pixel-wise models")
    parser.add_argument("--methods", nargs="+", default=list(segmentation_model.METHODS),
                        choices=list(segmentation_model.METHODS))
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.py's 1500)")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--set", default="", help="config overrides of the pixel-wise models, e.g. c=1,beta=0,lr=0.03")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = grid.parse_overrides(args.set)
    if args.steps is not None:
        overrides["training.steps"] = args.steps
    segmentation_study(args.data_dir, args.manifest, args.root, classifier_runs=args.classifier_runs, seeds=args.seeds,
                       methods=args.methods, split=args.split, overrides=overrides)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
