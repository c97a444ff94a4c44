"""The comparison's report (`experiments/comparison.py`): tuning, then per fresh data set the rows with
their seeds, paired differences, slide-bootstrap intervals, images seen and implied group weights.

It reads only what the comparison keeps (`--kept`, committed): the tuning's figures and choice, and per
fresh data set its test patches, training group counts and each run's test probabilities, from which
every WGA is recomputed (and checked against the evaluator's), so the intervals and the means come
from the same numbers.
"""
from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import grid, statistics
from experiments.comparison_rows import (
    GERNE_ARMS,
    IDENTIFICATION,
    REFERENCE,
    RESAMPLING,
    SCORING,
    Row,
    erm_setting,
    learning_rate,
    load_chosen,
)
from experiments.tables import markdown_table, over_seeds
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.evaluation import reports

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


def images_seen(setting: grid.Setting, common: Mapping[str, Any]) -> int:
    """Training images a run loads (steps x batches per step x batch), not counting runs it builds on."""
    if setting.method == "dfr":
        return 0
    config = grid.run_config(setting, 0, common)
    batch = NUM_CLASSES * NUM_BINS * config.training.batch_per_group
    return config.training.steps * PAIRED_ROWS.get(setting.method, 1) * batch


def kept_run(kept: pathlib.Path, run: str) -> dict[str, Any] | None:
    """A fresh run's kept figures (`comparison.keep_run`), None if it is not kept yet."""
    path = kept / f"{run}.npz"
    if not path.is_file():
        return None
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def test_patches(kept: pathlib.Path, tau: float) -> dict[str, Any]:
    """The data set's test patches: label, groups and slides, as the kept runs' probabilities are ordered."""
    with np.load(kept / "test_patches.npz") as stored:
        label, ratio, slide_id = stored["label"], stored["tissue_ratio"], stored["slide_id"]
    group = dataset.group_ids(label, dataset.attribute_from_tissue_ratio(ratio, (tau,)), NUM_CLASSES, NUM_BINS)
    return {"label": label, "tissue_ratio": ratio, "group": group, "slide_id": slide_id,
            "slides": sorted(set(slide_id.tolist()))}


def run_counts(figures: Mapping[str, Any], patches: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A kept run's test (correct, total) per slide and group; its WGA is checked against the evaluator's."""
    correct, total = statistics.group_correct_by_slide(figures["probability"], patches["label"], patches["group"],
                                                       patches["slide_id"], patches["slides"], NUM_CLASSES * NUM_BINS)
    wga = float(statistics.worst_group_accuracy(correct.sum(0), total.sum(0)))
    if not np.isclose(wga, float(figures["test_wga"]), atol=1e-6):
        raise ValueError(f"WGA {wga} from the kept probabilities, {float(figures['test_wga'])} from the evaluator")
    return correct, total


def fresh_table(kept: pathlib.Path, patches: Mapping[str, Any], chosen: Sequence[grid.Setting], rows: Sequence[Row],
                seeds: Sequence[int], tau: float,
                common: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One fresh data set (its `test_patches`): a table row per method row (its kept runs), and the figures
    behind it."""
    counts = np.asarray(json.loads((kept / "training_counts.json").read_text()))
    by_setting = {s.family: s for s in chosen}
    by_row: dict[str, dict[str, Any]] = {}
    for row in rows:
        setting = by_setting.get(row.name)
        figures = {seed: kept_run(kept, grid.run_name(setting, seed)) for seed in seeds} if setting else {}
        finished = {seed: f for seed, f in figures.items() if f is not None and not f["diverged"]}
        if not finished:
            continue
        per_run = [run_counts(f, patches) for f in finished.values()]
        by_row[row.name] = {
            "row": row, "setting": setting, "seeds": list(finished), "per_run": per_run,
            "diverged": sum(1 for f in figures.values() if f is not None and f["diverged"]),
            "wga": [float(f["test_wga"]) for f in finished.values()],
            "bca": [float(f["test_bca"]) for f in finished.values()],
            "probability": finished[min(finished)]["probability"], "bootstrap": statistics.slide_bootstrap(per_run)}
    if REFERENCE not in by_row:
        return [], by_row
    reference = by_row[REFERENCE]
    table = []
    for name, entry in by_row.items():
        row, setting = entry["row"], entry["setting"]
        wga_mean, wga_std = over_seeds(entry["wga"])
        bca_mean, bca_std = over_seeds(entry["bca"])
        low, high = statistics.percentile_interval(entry["bootstrap"])
        line = {"row": name, "c(beta+1)": "" if row.k is None else f"{row.k:g}",
                "loss share per group (" + ", ".join(group_names(tau)) + ")": implied_weights(row, counts),
                "lr": f"{learning_rate(setting):g}", "images seen": f"{images_seen(setting, common):,}",
                "seeds (diverged)": f"{len(entry['wga'])} ({entry['diverged']})",
                "test WGA": f"{wga_mean:.3f} ± {wga_std:.3f}", "WGA 95 % slide bootstrap": f"[{low:.3f}, {high:.3f}]",
                "test BCA": f"{bca_mean:.3f} ± {bca_std:.3f}",
                "WGA - ERM, paired over seeds: mean [95 % CI], p": "reference", "WGA - ERM, slide bootstrap 95 %": ""}
        paired = None if name == REFERENCE else _paired(entry, reference)
        if paired is not None:
            entry["paired"] = paired
            line["WGA - ERM, paired over seeds: mean [95 % CI], p"] = statistics.describe_difference(entry["paired"])
            line["WGA - ERM, slide bootstrap 95 %"] = _bootstrap_difference(entry, reference)
        elif name != REFERENCE:
            line["WGA - ERM, paired over seeds: mean [95 % CI], p"] = "fewer than 2 common seeds"
        table.append(line)
    return table, by_row


def _paired(entry: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float] | None:
    """WGA minus the reference's, paired by training seed over the seeds both have (None under two)."""
    common = [s for s in entry["seeds"] if s in reference["seeds"]]
    if len(common) < 2:
        return None
    mine = [entry["wga"][entry["seeds"].index(s)] for s in common]
    theirs = [reference["wga"][reference["seeds"].index(s)] for s in common]
    return statistics.paired_difference(mine, theirs)


def _bootstrap_difference(entry: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """The 95 % slide-bootstrap interval of the mean WGA difference, in points (the replicates draw the same slides)."""
    low, high = statistics.percentile_interval(entry["bootstrap"] - reference["bootstrap"])
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def group_accuracy_table(by_row: Mapping[str, Mapping[str, Any]], tau: float) -> list[dict[str, Any]]:
    """Per row, each group's test accuracy (mean over seeds) with the group's patch count."""
    table = []
    for name, entry in by_row.items():
        accuracy = np.mean([correct.sum(0) / np.maximum(total.sum(0), 1) for correct, total in entry["per_run"]], 0)
        counts = entry["per_run"][0][1].sum(0)
        table.append({"row": name, **{f"{group} (n={n})": f"{a:.3f}"
                                      for group, n, a in zip(group_names(tau), counts, accuracy)}})
    return table


def first_runs(common: Mapping[str, Any]) -> str:
    """The images of the runs some rows build on, which their `images seen` leaves out."""
    return (f"Images seen leave out the runs a row builds on: JTT's identification run "
            f"({images_seen(IDENTIFICATION, common):,}), the scoring run of pseudo-groups "
            f"({images_seen(SCORING, common):,}) and DFR's base run (an `erm` run, "
            f"{images_seen(erm_setting(0.1), common):,}).")


def _verdict(paired: Mapping[str, float], other: str) -> str:
    """A paired interval that excludes zero is a difference, else within noise."""
    if paired["low"] > 0:
        return f"above {other}"
    if paired["high"] < 0:
        return f"below {other}"
    return f"not different from {other} (the interval holds 0)"


def verdicts(by_row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per row on its paired WGA difference to ERM."""
    return [f"- {name}: {_verdict(entry['paired'], 'ERM')}, WGA {statistics.describe_difference(entry['paired'])}."
            for name, entry in by_row.items() if "paired" in entry]


def versus_resampling(by_row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each GERNE arm paired with resampling (same seeds, same data): whether interpolating (k < 1) or
    extrapolating (k > 1) beats plain group balance, with the paired t interval and the slide bootstrap."""
    resampling = by_row.get(RESAMPLING)
    arms = [row for row in GERNE_ARMS if row.name in by_row]
    if resampling is None or not arms:
        return []
    lines = ["GERNE arms against resampling (WGA, paired by training seed; slide bootstrap 95 %):", ""]
    for row in arms:
        entry = by_row[row.name]
        paired = _paired(entry, resampling)
        if paired is None:
            continue
        lines.append(f"- {row.name} (c(beta + 1) = {row.k:g}): {_verdict(paired, 'resampling')}, "
                     f"{statistics.describe_difference(paired)}; "
                     f"slide bootstrap {_bootstrap_difference(entry, resampling)}.")
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


def tuning_table(kept: pathlib.Path, rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per row: the learning rates tried on the calibration data, the runs, the choice and its validation figures."""
    with open(kept / "tuning.csv", newline="") as f:
        results = [r for r in csv.DictReader(f) if r["checkpoint"] == "best_wga"]
    chosen = {s.family: s.name for s in load_chosen(kept / "chosen.json", kept)}
    tried = json.loads((kept / "tried.json").read_text())
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


def plot_errors(by_row: Mapping[str, Mapping[str, Any]], patches: Mapping[str, Any], tau: float,
                path: pathlib.Path) -> None:
    """Error rate against tissue ratio of each row's first kept seed, with per-bin counts and intervals."""
    reports.plot_error_by_tissue_ratio(
        {name: (patches["label"], np.stack([1 - e["probability"], e["probability"]], 1), patches["tissue_ratio"])
         for name, e in by_row.items()}, path, taus=(tau,))


def write_report(kept: pathlib.Path, fresh: Sequence[pathlib.Path], rows: Sequence[Row], seeds: Sequence[int],
                 tau: float, common: Mapping[str, Any]) -> pathlib.Path:
    """KEPT/results.md and its PNGs from what is kept: the tuning, and each fresh data set's kept runs."""
    lines = ["# Comparison: tuned on calibration data, reported on fresh data", "",
             "Protocol: [docs/comparison.md](../comparison.md). Tiny ResNet with GroupNorm for every row, "
             f"tau = {tau:g}, `best_wga` checkpoints (validation WGA).", ""]
    if (kept / "tuning.csv").is_file():
        lines += ["## Tuning on the calibration data, validation split only", "",
                  markdown_table(tuning_table(kept, rows)), ""]
    tables = {}
    for folder in fresh:
        if not (folder / "test_patches.npz").is_file():
            lines += [f"## {folder.name}: not started", ""]
            continue
        chosen = load_chosen(kept / "chosen.json", kept)
        patches = test_patches(folder, tau)
        table, by_row = fresh_table(folder, patches, chosen, rows, seeds, tau, common)
        if not table:
            lines += [f"## {folder.name}: no kept runs of the reference row yet", ""]
            continue
        tables[folder.name] = by_row
        plot_errors(by_row, patches, tau, kept / f"{folder.name}_error_vs_tissue_ratio.png")
        lines += [f"## {folder.name}: test split, training seeds {', '.join(map(str, seeds))}", "",
                  markdown_table(table), "", first_runs(common), "", *verdicts(by_row), "",
                  *versus_resampling(by_row), "",
                  "Per-group test accuracy, mean over seeds:", "",
                  markdown_table(group_accuracy_table(by_row, tau)), "",
                  f"![error rate against tissue ratio, first seed]({folder.name}_error_vs_tissue_ratio.png)", ""]
    if tables:
        plot(tables, kept / "wga_per_seed.png")
        lines += ["![test WGA per seed](wga_per_seed.png)", ""]
    files.write_text_atomic(kept / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return kept / "results.md"
