"""The comparison of every method, tuned on calibration data and reported on fresh data (docs/comparison.md).

    python -m experiments.comparison --root runs/comparison         # all stages; rerun to resume
    python -m experiments.comparison --root runs/quick --kept runs/quick/kept --set steps=20 --slides 4 --size 512
    python -m experiments.comparison --root runs/defaults_3072 --kept docs/defaults_3072 \
        --settings-from docs/comparison/chosen.json --rows erm gerne_k0.75 --size 3072 --fresh-seeds 2029 --seeds 0 1 2

Stages (resumable: finished runs are skipped, interrupted ones resume, two processes may share ROOT;
experiments/grid.py):
1. data: `sections` synthetic slides (both minority groups hard), 64-pixel patches, tau = 0.1: the
   calibration data set (data seed `CALIBRATION_SEED`) and the fresh ones (`FRESH_SEEDS`, never
   generated for anything else before this comparison).
2. tuning, on the calibration data's validation split only (its test split is never evaluated): every
   row trains the same learning-rate grid (`LEARNING_RATES`) with one fixed method-specific setting
   (`ROWS`), training seed 0, the same network (tiny ResNet, GroupNorm), schedule and steps. A row whose
   best learning rate (validation WGA, `best_wga` checkpoints) lies at an edge of what it tried gets the
   next value of `LADDER` beyond it, until the best is inside or the ladder ends. The choice, the values
   tried and every tuning run's figures are kept in KEPT (`--kept`, committed: docs/comparison); a kept
   choice is final, so later invocations (another session, without the runs) go straight to stage 3.
3. fresh data: every chosen setting with training seeds `SEEDS` on each fresh data set (nothing is
   tuned there). Each run is kept as soon as it is trained: its `best_wga` checkpoint's test
   probabilities and figures, `KEPT/fresh_data<S>/<run>.npz` (kept runs are not trained again).
4. report (`experiments/comparison_report.py`, from KEPT alone): per row mean and sample std, the per-seed
   paired difference to class-balanced ERM with a 95 % t interval, a 95 % bootstrap interval of WGA over
   test slides, images seen, and each GERNE row's c(beta + 1) and implied group weights. `KEPT/results.md`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import stats
from experiments import comparison_report, grid, patch_size
from experiments.comparison_rows import (
    IDENTIFICATION,
    LADDER,
    REFERENCE,
    ROWS,
    ROWS_BY_NAME,
    SCORING,
    Row,
    erm_setting,
    learning_rate,
    load_chosen,
    row_setting,
    run_template,
    save_chosen,
)
from experiments.grid import Setting
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate

TAU = 0.1
CALIBRATION_SEED = 0  # the data seed the generator and the settings were calibrated on; never reported
FRESH_SEEDS = (2027, 2028)
SLIDES, SIZE = 24, 2048
SEEDS = (0, 1, 2, 3, 4)
TUNING_SEED = 0
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3)
KEPT = pathlib.Path("docs/comparison")  # what the comparison keeps (committed); its runs stay under --root
CHOSEN, TUNING_CSV = "chosen.json", "tuning.csv"
TEST_PATCHES, TRAINING_COUNTS = "test_patches.npz", "training_counts.json"
# Every run: configs/demo.py's method config with these (the demo's warm-up and cosine decay, GroupNorm).
COMMON = {"model.norm": "group", "optimizer.schedule": "cosine", "optimizer.warmup_steps": 100,
          "data.taus": (TAU,)}


def prerequisites(settings: Sequence[Setting], runs: pathlib.Path) -> list[Setting]:
    """The runs `settings` build on (JTT's identification run, the scoring run, DFR's bases), to train first."""
    candidates = [IDENTIFICATION, SCORING, *(erm_setting(lr) for lr in LADDER)]
    by_folder = {run_template(s, runs): s for s in candidates}
    needed = dict.fromkeys(value for s in settings for value in s.overrides.values()
                           if isinstance(value, str) and value in by_folder)
    return [by_folder[folder] for folder in needed]


def train_prerequisites(settings: Sequence[Setting], seeds: Sequence[int], runs: pathlib.Path,
                        common: Mapping[str, Any]) -> None:
    grid.train_all({runs / grid.run_name(s, seed): grid.run_config(s, seed, common)
                    for s in prerequisites(settings, runs) for seed in seeds})


def make_data(root: pathlib.Path, data_seed: int, slides: int, size: int) -> pathlib.Path:
    """`sections` slides and their 64-pixel patches under ROOT (safe for several processes); the group
    counts and the tissue-ratio plot once."""
    manifest = patch_size.make_slides(root, patch_size.DataSize(slides=slides, size=size, seed=data_seed))
    data = root / "data"
    tiled_before = (data / "metadata.json").is_file()
    patch_size.tile(manifest, data, 64)
    if not tiled_before:
        table = dataset.read_patch_table(data)
        print(stats.format_group_counts(stats.split_group_counts(table, TAU), TAU))
        stats.plot_tissue_ratio(table, (TAU,), data / stats.PLOT_FILE)
    return data


def extended(tried: Mapping[str, Sequence[float]], chosen: Sequence[Setting]) -> dict[str, list[float]]:
    """The learning rates each row tries next: one more step of `LADDER` beyond a chosen edge value."""
    grown = {name: list(rates) for name, rates in tried.items()}
    for setting in chosen:
        rates, lr = sorted(tried[setting.family]), learning_rate(setting)
        step = -1 if lr == rates[0] else 1 if lr == rates[-1] else 0
        position = LADDER.index(lr) + step
        if step and 0 <= position < len(LADDER) and LADDER[position] not in rates:
            grown[setting.family].append(LADDER[position])
    return grown


def tune(root: pathlib.Path, kept: pathlib.Path, common: Mapping[str, Any], rows: Sequence[Row]) -> list[Setting]:
    """Stage 2: every row's learning rates on the calibration data's validation split, extended at the edges;
    the choice (`chosen.json`), the values tried and every run's figures (`tuning.csv`) are kept in KEPT."""
    runs = root / "runs"
    tried = {row.name: list(LEARNING_RATES) for row in rows}
    while True:
        settings = [row_setting(row, lr, runs) for row in rows for lr in sorted(tried[row.name])]
        train_prerequisites(settings, [TUNING_SEED], runs, common)
        summary = grid.run_grid(settings, [TUNING_SEED], runs, common=common, split="validation",
                                out=root / "tuning")
        chosen = grid.chosen_settings(summary, settings)["best_wga"]
        grown = extended(tried, chosen)
        if grown == tried:
            kept.mkdir(parents=True, exist_ok=True)
            files.write_text_atomic(kept / "tried.json", json.dumps(tried, indent=2))
            files.write_text_atomic(kept / TUNING_CSV, (root / "tuning" / "results.csv").read_text())
            save_chosen(kept / CHOSEN, chosen, runs)
            return chosen
        tried = grown


def write_data_record(data: pathlib.Path, kept: pathlib.Path) -> None:
    """What the report needs of a data set beside the runs, kept once: the test patches (label, tissue
    ratio, slide) and the training split's group counts. Data regenerated on another machine must give
    the kept test patches exactly, or the kept runs' probabilities would be read against other patches."""
    table = dataset.read_patch_table(data, "test")
    if (kept / TEST_PATCHES).is_file():
        with np.load(kept / TEST_PATCHES) as stored:
            if any(not np.array_equal(stored[key], table[key]) for key in ("label", "tissue_ratio", "slide_id")):
                raise ValueError(f"{data}'s test patches differ from those kept in {kept / TEST_PATCHES}: "
                                 "the data set was not regenerated as it was")
        return
    kept.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(kept / TEST_PATCHES) as temporary, open(temporary, "wb") as f:
        np.savez_compressed(f, label=table["label"], tissue_ratio=table["tissue_ratio"], slide_id=table["slide_id"])
    counts = comparison_report.training_counts(data, TAU)
    files.write_text_atomic(kept / TRAINING_COUNTS, json.dumps(counts.tolist()))


def keep_run(workdir: pathlib.Path, kept: pathlib.Path, split_cache: dict[str, Any]) -> None:
    """A finished run's test figures at its `best_wga` checkpoint, kept as `KEPT/<run>.npz`: the per-patch
    tumour probabilities, the step and the validation figures it was chosen on, the evaluator's WGA and
    BCA (or `diverged`). Small enough to commit, so a later session reports without the runs."""
    figures: dict[str, Any] = {"diverged": grid.diverged(workdir)}
    if not figures["diverged"]:
        entry = evaluate.evaluate_run(workdir, "best_wga", "test", split_cache=split_cache)
        (report,) = entry.reports.values()
        figures.update(probability=entry.probabilities[:, 1].astype(np.float32), step=entry.checkpoint_meta["step"],
                       val_wga=entry.checkpoint_meta["metrics"]["worst_group_accuracy"],
                       val_bca=entry.checkpoint_meta["metrics"]["balanced_class_accuracy"],
                       test_wga=report["worst_group_accuracy"], test_bca=report["balanced_class_accuracy"])
    with files.atomic_write(kept / f"{workdir.name}.npz") as temporary, open(temporary, "wb") as f:
        np.savez_compressed(f, **figures)


def evaluate_fresh(root: pathlib.Path, kept: pathlib.Path, chosen: Sequence[Setting], seeds: Sequence[int],
                   common: Mapping[str, Any]) -> None:
    """Stage 3 on one fresh data set: each chosen setting and seed trained, then kept (`keep_run`) at once,
    run by run, so a stopped comparison loses at most the runs in progress; kept runs are not trained again.
    Several processes share the work: a run another process holds is left for the end (then waited for)."""
    runs = root / "runs"
    write_data_record(root / "data", kept)
    split_cache: dict[str, Any] = {}

    def train_and_keep(setting: Setting, seed: int) -> None:
        workdir = runs / grid.run_name(setting, seed)
        if (kept / f"{workdir.name}.npz").is_file():
            return
        train_prerequisites([setting], [seed], runs, common)
        grid.train_all({workdir: grid.run_config(setting, seed, common)})
        keep_run(workdir, kept, split_cache)

    pending = []
    for setting in chosen:
        for seed in seeds:
            with grid.claim(root / "keeping" / grid.run_name(setting, seed)) as mine:
                if mine:
                    train_and_keep(setting, seed)
                else:
                    pending.append((setting, seed))
    for setting, seed in pending:
        with grid.claim(root / "keeping" / grid.run_name(setting, seed), wait=True):
            train_and_keep(setting, seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=pathlib.Path, help="the data and the runs")
    parser.add_argument("--kept", type=pathlib.Path, default=KEPT,
                        help="what is kept (committed): the choice, the tuning figures, each fresh run's test "
                             "figures, the report")
    parser.add_argument("--slides", type=int, default=SLIDES)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED)
    parser.add_argument("--fresh-seeds", type=int, nargs="+", default=list(FRESH_SEEDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rows", nargs="+", default=[row.name for row in ROWS], choices=list(ROWS_BY_NAME))
    parser.add_argument("--set", default="", help="overrides of every run, e.g. steps=300 (a quick look)")
    parser.add_argument("--settings-from", type=pathlib.Path, default=None,
                        help="chosen.json of an earlier comparison: no tuning, its choices on the fresh data sets")
    parser.add_argument("--report-only", action="store_true", help="write KEPT/results.md from the kept runs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [ROWS_BY_NAME[name] for name in args.rows]
    if REFERENCE not in args.rows:
        raise ValueError(f"--rows must include {REFERENCE}, the row every other is paired with")
    common = {**COMMON, **grid.parse_overrides(args.set)}
    calibration = args.root / f"calibration_data{args.calibration_seed}"
    fresh = {seed: args.root / f"fresh_data{seed}" for seed in args.fresh_seeds}
    kept = args.kept
    if args.settings_from and not (kept / CHOSEN).is_file():
        chosen = [s for s in load_chosen(args.settings_from, calibration / "runs") if s.family in args.rows]
        save_chosen(kept / CHOSEN, chosen, calibration / "runs")
    if not args.report_only:
        if not (kept / CHOSEN).is_file():  # tuned once: a kept choice is final (remove it to tune again)
            make_data(calibration, args.calibration_seed, args.slides, args.size)
            tune(calibration, kept, {**common, "data.dir": str(calibration / "data")}, rows)
        for seed, folder in fresh.items():
            make_data(folder, seed, args.slides, args.size)
            chosen = [s for s in load_chosen(kept / CHOSEN, folder / "runs") if s.family in args.rows]
            evaluate_fresh(folder, kept / folder.name, chosen, args.seeds, {**common, "data.dir": str(folder / "data")})
    comparison_report.write_report(kept, [kept / folder.name for folder in fresh.values()], rows, args.seeds, TAU,
                                   common)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
