"""The comparison's report (`experiments/comparison.py`): tuning, then per fresh data set the rows with
their seeds, paired differences, slide-bootstrap intervals, images seen and implied group weights.

Every test figure is recomputed from the saved per-patch probabilities (`grid.PREDICTIONS`) and checked
against the grid's own evaluation, so the intervals and the means come from the same numbers.
"""
from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import grid, statistics
from experiments.comparison_rows import REFERENCE, Row, learning_rate, load_chosen
from experiments.tables import markdown_table, over_seeds
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.runs import run_log

NUM_CLASSES, NUM_BINS = len(dataset.CLASS_NAMES), 2
PAIRED_ROWS = {"gerne": 2, "resample": 2}  # batches per step by method (GERNE's pair), else 1; DFR trains none


def group_names(tau: float) -> list[str]:
    return [f"{name} {bin_name}" for name in dataset.CLASS_NAMES for bin_name in dataset.tissue_bin_names((tau,))]


def training_counts(data_dir: pathlib.Path, tau: float) -> np.ndarray:
    """Training-split group counts `[K, A]` of a DATA_DIR."""
    table = dataset.read_patch_table(data_dir)
    train = table["split"] == "train"
    attribute = dataset.attribute_from_tissue_ratio(table["tissue_ratio"][train], (tau,))
    return dataset.group_counts(table["label"][train], attribute, NUM_CLASSES, NUM_BINS)


def implied_weights(row: Row, counts: np.ndarray) -> str:
    """Each group's expected share of a step's loss (groups in `group_names` order), or how it is set."""
    alpha = counts / counts.sum(axis=1, keepdims=True)
    if row.name == "erm_natural":
        weights = counts / counts.sum()
    elif row.name in ("erm", "jtt"):
        weights = alpha / NUM_CLASSES
    elif row.k is not None and row.name != "gerne_pseudo":
        weights = (alpha + row.k * (1.0 / NUM_BINS - alpha)) / NUM_CLASSES
    else:
        return {"group_dro": "0.25 each, then online weights", "dfr": "balanced subsamples of validation",
                "gerne_pseudo": "k = 1 on pseudo-groups"}[row.name]
    text = " / ".join(f"{w:.2f}" for w in weights.ravel())
    return text + (" (errors x 20)" if row.name == "jtt" else "")


def images_seen(workdir: pathlib.Path, method: str) -> int:
    """Training images a run loaded (steps x batches per step x batch), not counting runs it builds on."""
    config = run_log.read_config(workdir)
    if method == "dfr":
        return 0
    batch = NUM_CLASSES * NUM_BINS * config.training.batch_per_group
    return config.training.steps * PAIRED_ROWS.get(method, 1) * batch


def read_rows(results_dir: pathlib.Path) -> list[dict[str, Any]]:
    with open(results_dir / "results.csv", newline="") as f:
        return [{**row, "seed": int(row["seed"])} for row in csv.DictReader(f)]


def run_counts(results_dir: pathlib.Path, run: str, tau: float,
               slides: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """A run's test (correct, total) per slide and group from its saved predictions, and its WGA."""
    saved = np.load(results_dir / "eval" / grid.PREDICTIONS / f"{run}_best_wga.npz")
    attribute = dataset.attribute_from_tissue_ratio(saved["tissue_ratio"], (tau,))
    group = dataset.group_ids(saved["label"], attribute, NUM_CLASSES, NUM_BINS)
    slides = sorted(set(saved["slide_id"].tolist())) if slides is None else slides
    correct, total = statistics.group_correct_by_slide(saved["probability"], saved["label"], group, saved["slide_id"],
                                                       slides, NUM_CLASSES * NUM_BINS)
    return correct, total, float(statistics.worst_group_accuracy(correct.sum(0), total.sum(0)))


def fresh_table(folder: pathlib.Path, rows: Sequence[Row], seeds: Sequence[int],
                tau: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fresh data set: a table row per method row, and the figures behind it (for the text and plot)."""
    results = [r for r in read_rows(folder / "seeds") if r["checkpoint"] == "best_wga"]
    counts = training_counts(folder / "data", tau)
    chosen = {s.family: s for s in _chosen(folder)}
    by_row: dict[str, dict[str, Any]] = {}
    slides = None
    for row in rows:
        mine = sorted((r for r in results if r["family"] == row.name), key=lambda r: r["seed"])
        if not mine:
            continue
        runs = [f"{r['setting']}_seed{r['seed']}" for r in mine]
        per_run = []
        for run, result in zip(runs, mine):
            correct, total, wga = run_counts(folder / "seeds", run, tau, slides)
            if not np.isclose(wga, float(result["test WGA"]), atol=1e-9):
                raise ValueError(f"{run}: WGA {wga} from its saved predictions, {result['test WGA']} in results.csv")
            slides = slides or sorted(set(np.load(folder / "seeds" / "eval" / grid.PREDICTIONS /
                                                  f"{run}_best_wga.npz")["slide_id"].tolist()))
            per_run.append((correct, total))
        by_row[row.name] = {"row": row, "seeds": [r["seed"] for r in mine], "runs": runs, "per_run": per_run,
                            "wga": [float(r["test WGA"]) for r in mine], "bca": [float(r["test BCA"]) for r in mine],
                            "bootstrap": statistics.slide_bootstrap(per_run),
                            "images": images_seen(folder / "runs" / runs[0], row.method)}
    reference = by_row[REFERENCE]
    table = []
    for name, entry in by_row.items():
        row = entry["row"]
        wga_mean, wga_std = over_seeds(entry["wga"])
        bca_mean, bca_std = over_seeds(entry["bca"])
        low, high = statistics.percentile_interval(entry["bootstrap"])
        line = {"row": name, "c(beta+1)": "" if row.k is None else f"{row.k:g}",
                "loss share per group (" + ", ".join(group_names(tau)) + ")": implied_weights(row, counts),
                "lr": f"{learning_rate(chosen[name]):g}" if name in chosen else "",
                "images seen": f"{entry['images']:,}",
                "seeds": len(entry["wga"]), "test WGA": f"{wga_mean:.3f} ± {wga_std:.3f}",
                "WGA 95 % slide bootstrap": f"[{low:.3f}, {high:.3f}]", "test BCA": f"{bca_mean:.3f} ± {bca_std:.3f}"}
        if name != REFERENCE:
            paired = _paired(entry, reference)
            entry["paired"] = paired
            difference = statistics.percentile_interval(entry["bootstrap"] - reference["bootstrap"])
            line["WGA - ERM, paired over seeds: mean [95 % CI], p"] = statistics.describe_difference(paired)
            line["WGA - ERM, slide bootstrap 95 %"] = f"[{100 * difference[0]:+.1f}, {100 * difference[1]:+.1f}]"
        else:
            line["WGA - ERM, paired over seeds: mean [95 % CI], p"] = "reference"
            line["WGA - ERM, slide bootstrap 95 %"] = ""
        table.append(line)
    return table, by_row


def _chosen(folder: pathlib.Path) -> list[grid.Setting]:
    return load_chosen(folder / "chosen.json", folder / "runs") if (folder / "chosen.json").is_file() else []


def _paired(entry: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
    """WGA minus the reference's, paired by training seed over the seeds both have."""
    common = [s for s in entry["seeds"] if s in reference["seeds"]]
    mine = [entry["wga"][entry["seeds"].index(s)] for s in common]
    theirs = [reference["wga"][reference["seeds"].index(s)] for s in common]
    return statistics.paired_difference(mine, theirs)


def group_accuracy_table(by_row: Mapping[str, Mapping[str, Any]], tau: float) -> list[dict[str, Any]]:
    """Per row, each group's test accuracy (mean over seeds) with the group's patch count."""
    table = []
    for name, entry in by_row.items():
        accuracy = np.mean([correct.sum(0) / np.maximum(total.sum(0), 1) for correct, total in entry["per_run"]], 0)
        counts = entry["per_run"][0][1].sum(0)
        table.append({"row": name, **{f"{group} (n={n})": f"{a:.3f}"
                                      for group, n, a in zip(group_names(tau), counts, accuracy)}})
    return table


def verdicts(by_row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per row: a paired interval that excludes zero is a difference, else within noise."""
    lines = []
    for name, entry in by_row.items():
        paired = entry.get("paired")
        if paired is None:
            continue
        if paired["low"] > 0:
            verdict = "above ERM"
        elif paired["high"] < 0:
            verdict = "below ERM"
        else:
            verdict = "not different from ERM (the interval holds 0)"
        lines.append(f"- {name}: {verdict}, WGA {statistics.describe_difference(paired)} points.")
    return lines


def plot(tables: Mapping[str, Mapping[str, Mapping[str, Any]]], path: pathlib.Path) -> None:
    """Per fresh data set: each row's per-seed test WGA (dots), mean and slide-bootstrap interval (bar)."""
    fig, axes = files.new_figure(1, len(tables), figsize=(7 * len(tables), 4.2), sharey=True, squeeze=False)
    for axis, (title, by_row) in zip(axes[0], tables.items()):
        names = list(by_row)
        for x, name in enumerate(names):
            entry = by_row[name]
            low, high = statistics.percentile_interval(entry["bootstrap"])
            mean = float(np.mean(entry["wga"]))
            axis.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="s", color="black", capsize=4)
            axis.plot(np.full(len(entry["wga"]), x) + np.linspace(-0.15, 0.15, len(entry["wga"])), entry["wga"],
                      "o", alpha=0.6)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_title(f"{title}: test WGA per seed; mean, 95 % slide bootstrap")
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, path)


def tuning_table(calibration: pathlib.Path, rows: Sequence[Row]) -> list[dict[str, Any]]:
    results = [r for r in read_rows(calibration / "tuning") if r["checkpoint"] == "best_wga"]
    chosen = {s.family: s.name for s in _chosen_calibration(calibration)}
    tried = json.loads((calibration / "tried.json").read_text()) if (calibration / "tried.json").is_file() else {}
    table = []
    for row in rows:
        mine = [r for r in results if r["family"] == row.name]
        best = next((r for r in mine if r["setting"] == chosen.get(row.name)), None)
        table.append({"row": row.name, "trains on": row.summary,
                      "learning rates tried": ", ".join(f"{lr:g}" for lr in sorted(tried.get(row.name, []))),
                      "runs (diverged)": f"{len(mine)} ({len(tried.get(row.name, [])) - len(mine)})",
                      "chosen": "" if best is None else best["setting"],
                      "val WGA": "" if best is None else f"{float(best['val WGA']):.3f}",
                      "val BCA": "" if best is None else f"{float(best['val BCA']):.3f}"})
    return table


def _chosen_calibration(calibration: pathlib.Path) -> list[grid.Setting]:
    path = calibration.parent / "chosen.json"
    return load_chosen(path, calibration / "runs") if path.is_file() else []


def write_report(root: pathlib.Path, calibration: pathlib.Path, fresh: Sequence[pathlib.Path], rows: Sequence[Row],
                 seeds: Sequence[int], tau: float) -> pathlib.Path:
    """ROOT/results.md and ROOT/wga_per_seed.png from whatever stages have finished."""
    lines = ["# Comparison: tuned on calibration data, reported on fresh data", "",
             "Protocol: [docs/comparison.md](../../docs/comparison.md). Tiny ResNet with GroupNorm for every row, "
             f"tau = {tau:g}, `best_wga` checkpoints (validation WGA).", ""]
    if (calibration / "tuning" / "results.csv").is_file():
        lines += [f"## Tuning on {calibration.name}, validation split only", "",
                  markdown_table(tuning_table(calibration, rows)), ""]
    tables = {}
    for folder in fresh:
        if not (folder / "seeds" / "results.csv").is_file():
            lines += [f"## {folder.name}: not finished", ""]
            continue
        table, by_row = fresh_table(folder, rows, seeds, tau)
        tables[folder.name] = by_row
        lines += [f"## {folder.name}: test split, training seeds {', '.join(map(str, seeds))}", "",
                  markdown_table(table), "", *verdicts(by_row), "",
                  "Per-group test accuracy, mean over seeds:", "",
                  markdown_table(group_accuracy_table(by_row, tau)), ""]
    if tables:
        plot(tables, root / "wga_per_seed.png")
        lines += ["![test WGA per seed](wga_per_seed.png)", ""]
    files.write_text_atomic(root / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return root / "results.md"
