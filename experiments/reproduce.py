"""Reproduces docs/results.md's results on the synthetic slides, from data to tables, tuning on validation only.

  python -m experiments.reproduce --root runs/exp        # or `make experiments`: 1.5-2 hours on 2 CPU cores

Steps (all resumable: finished runs are skipped, interrupted ones resume):
1. data: `--slides` synthetic slides (`--size` pixels, `--data-seed`), 64-pixel patches in ROOT/data.
2. tuning, seed 0, tau 0.1 (`ROOT/tuning/`): the learning rate of ERM and of resampling (c = 1,
   beta = 0), and (c, beta, learning rate) of GERNE, all with GroupNorm (a setting chosen at the top
   learning rate is also tried at the next rung of the ladder; these rounds' results are in
   subfolders); then, at each family's chosen setting and the learning rates next to it, BatchNorm
   with statistics shared by the paired batches (the normalisation a model trained from scratch can
   use with GERNE, docs/design.md §4). Each family's setting is chosen on validation WGA (for the
   `best_wga` rule) and on validation BCA (`best_bca`).
3. seeds (`ROOT/seeds/`): every setting chosen in step 2, under either rule, trained with seeds 0, 1 and
   2; each rule then picks, per family, the candidate with the best mean validation figure over the
   seeds and reports its test mean and standard deviation (experiment 3).
4. tau sweep (`ROOT/tau/`, experiment 2): each family's WGA-chosen setting trained at tau 0.03, 0.1 and
   0.2 (seed 0); group sizes and test WGA per tau.
5. error against tissue ratio (`ROOT/error_vs_tissue_ratio/`, experiment 1) for the tuned ERM and
   GERNE runs of seed 0.

Steps 2 and 3 train in ROOT/runs (step 4 in ROOT/tau/tau<tau>/); their summaries are
`experiments/grid.py` outputs.
ROOT/results.md gathers them: experiment 3's table, the differences the papers' claims are about,
the grid searched, and links to every other table and PNG (`--report-only` rewrites just that file).
Several processes on the same ROOT share the training (see grid.py), e.g. two on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
from collections.abc import Sequence

from data_pipeline import stats, tile_manifest
from data_pipeline.synthetic import writing
from experiments import error_vs_tissue_ratio, grid, tau_sweep
from experiments.grid import Setting
from experiments.tables import markdown_table, mean_std
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.slides.scan import TilingConfig

LR = "optimizer.learning_rate"
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3)  # the same grid for every method
LEARNING_RATE_LADDER = (*LEARNING_RATES, 1.0)  # a choice at the grid's top also tries the next rung
GERNE_C_BETA = ((0.5, 0.5), (0.5, 1.0), (0.5, 2.0), (1.0, 0.5), (1.0, 1.0))
TUNING_SETTINGS = (
    [Setting("erm", {LR: lr}) for lr in LEARNING_RATES]
    + [Setting("resample", {LR: lr}) for lr in LEARNING_RATES]
    + [Setting("gerne", {"method.c": c, "method.beta": beta, LR: lr}) for c, beta in GERNE_C_BETA
       for lr in LEARNING_RATES])
TUNING_SEED = 0
SEEDS = (0, 1, 2)
TAUS = (0.03, 0.1, 0.2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--slides", type=int, default=36)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--set", default="", help="overrides of every run (as in grid.py), e.g. steps=300 "
                        "for a dry run")
    parser.add_argument("--data-only", action="store_true", help="stop after step 1")
    parser.add_argument("--report-only", action="store_true", help="only rewrite ROOT/results.md")
    return parser.parse_args(argv)


def upward_settings(setting: Setting) -> list[Setting]:
    """The setting at the ladder's next learning rate if it sits at the grid's top, else nothing."""
    if setting.overrides[LR] != LEARNING_RATES[-1]:
        return []
    return [setting.updated({LR: LEARNING_RATE_LADDER[len(LEARNING_RATES)]})]


def normalisation_settings(setting: Setting) -> list[Setting]:
    """BatchNorm with shared statistics at the setting's learning rate and the ladder's neighbours of it."""
    index = LEARNING_RATE_LADDER.index(setting.overrides[LR])
    return [setting.updated({LR: lr, "model.norm": "shared"})
            for lr in LEARNING_RATE_LADDER[max(index - 1, 0):index + 2]]


def write_report(root: pathlib.Path) -> pathlib.Path:
    """ROOT/results.md from the outputs of steps 2-5."""
    summary = json.loads((root / "seeds" / "summary.json").read_text())
    table = [{"method": e["family"], "checkpoint and setting chosen on": e["tuned on"],
              "chosen setting": e["chosen setting"], "seeds": e["seeds"],
              **{f"{prefix} {metric}": mean_std(e, f"{prefix} {metric}", decimals=3)
                 for prefix in ("test", "val") for metric in ("WGA", "BCA")}} for e in summary]
    by_wga = {e["family"]: e for e in summary if e["checkpoint"] == "best_wga"}
    by_bca = {e["family"]: e for e in summary if e["checkpoint"] == "best_bca"}

    def points(a: dict, a_metric: str, b: dict, b_metric: str) -> str:
        return f"{100 * (a[f'test {a_metric} mean'] - b[f'test {b_metric} mean']):+.1f}"

    erm = by_wga["erm"]
    differences = [f"- ERM: test BCA - test WGA = {points(erm, 'BCA', erm, 'WGA')} points."]
    for name in ("resample", "gerne"):
        if name in by_wga:
            entry = by_wga[name]
            differences.append(f"- {name} - ERM (both chosen on validation WGA): WGA "
                               f"{points(entry, 'WGA', erm, 'WGA')} points, "
                               f"BCA {points(entry, 'BCA', erm, 'BCA')} points.")
    for name in by_bca:
        differences.append(f"- {name}, chosen on validation BCA instead of WGA: test WGA "
                           f"{points(by_bca[name], 'WGA', by_wga[name], 'WGA')} points, test BCA "
                           f"{points(by_bca[name], 'BCA', by_wga[name], 'BCA')} points.")
    tuned = json.loads((root / "tuning" / "summary.json").read_text())
    searched = sorted({row["setting"] for row in _csv_rows(root / "tuning" / "results.csv")})
    lines = [
        "# Results on the built-in synthetic slides (not the papers' microscopy data)", "",
        "Reproduce: `make experiments` (`python -m experiments.reproduce --root ROOT`). Test split, "
        f"tau = 0.1, mean ± standard deviation over seeds {', '.join(map(str, SEEDS))}. Hyperparameters and "
        "checkpoints are chosen on the validation split only: on validation WGA (rows `val WGA`) or on "
        "validation BCA (rows `val BCA`).", "",
        markdown_table(table), "", "![test WGA and BCA](seeds/summary.png)", "",
        "## Differences", "", *differences, "",
        f"## Grid searched (seed {TUNING_SEED}; then the chosen settings over {len(SEEDS)} seeds)", "",
        f"{len(searched)} settings: " + ", ".join(f"`{s}`" for s in searched) + ".", "",
        f"Chosen on seed {TUNING_SEED}: "
        + "; ".join(f"{e['family']} by {e['tuned on']}: `{e['chosen setting']}`" for e in tuned) + ".", "",
        "Every run's figures: [tuning/results.md](tuning/results.md), [seeds/results.md](seeds/results.md).",
        "", "## Experiment 2: tau", "", "[tau/results.md](tau/results.md)", "",
        "![WGA against tau](tau/wga_vs_tau.png)", "",
        "## Experiment 1: error rate against tissue ratio", "",
        "[error_vs_tissue_ratio/results.md](error_vs_tissue_ratio/results.md)", "",
        "![error rate against tissue ratio](error_vs_tissue_ratio/error_vs_tissue_ratio.png)", ""]
    files.write_text_atomic(root / "results.md", "\n".join(lines))
    print("\n".join(lines[:8] + differences))
    return root / "results.md"


def _csv_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_data(root: pathlib.Path, args: argparse.Namespace) -> pathlib.Path:
    """Step 1 through the data pipeline's functions: synthetic slides, tiling, group statistics."""
    manifest, data = root / "slides" / "manifest.csv", root / "data"
    if not manifest.is_file():
        writing.generate(root / "slides", args.slides, args.size, seed=args.data_seed)
    if not (data / "metadata.json").is_file():
        tile_manifest.tile_manifest(manifest, data, TilingConfig(patch_size=64, stride=64), workers=2)
        table = dataset.read_patch_table(data)
        for tau in TAUS:
            print(stats.format_group_counts(stats.split_group_counts(table, tau), tau), end="\n\n")
        stats.plot_tissue_ratio(table, TAUS, data / stats.PLOT_FILE)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.root)
    if args.report_only:
        write_report(root)
        return 0
    data = make_data(root, args)
    if args.data_only:
        return 0
    # GroupNorm unless a setting says otherwise, whatever configs/demo.py's per-method defaults are.
    common = {"data.dir": str(data), "model.norm": "group", **grid.parse_overrides(args.set)}
    runs = root / "runs"

    def tune(settings: Sequence[Setting], out: pathlib.Path) -> dict[str, list[Setting]]:
        """The tuning seed of `settings`, results in `out`; the settings chosen per checkpoint rule.

        Each round has its own results folder: sharing one, a round's evaluation stamp would replace
        the previous round's, and a rerun, or a second process a round behind, would evaluate again.
        """
        summary = grid.run_grid(settings, [TUNING_SEED], runs, common=common, out=out)
        return grid.chosen_settings(summary, settings)

    # Step 2: tuning on seed 0 with GroupNorm (one more learning rate for a choice at the grid's
    # top), then the normalisation around each family's choice.
    chosen = tune(TUNING_SETTINGS, root / "tuning" / "groupnorm")
    upward = [s for rule in chosen.values() for c in rule for s in upward_settings(c)]
    tuning = list(dict.fromkeys([*TUNING_SETTINGS, *upward]))
    if upward:
        chosen = tune(tuning, root / "tuning" / "groupnorm_upward")
    normalisation = [s for c in chosen["best_wga"] for s in normalisation_settings(c)]
    tuning = list(dict.fromkeys([*tuning, *normalisation]))
    chosen = tune(tuning, root / "tuning")

    # Step 3: the chosen settings of both rules over three seeds (experiment 3).
    candidates = list(dict.fromkeys(chosen["best_wga"] + chosen["best_bca"]))
    summary = grid.run_grid(candidates, SEEDS, runs, common=common, out=root / "seeds")
    by_wga = grid.chosen_settings(summary, candidates)["best_wga"]

    # Step 4: tau sweep with the WGA-chosen settings (experiment 2).
    tau_sweep.tau_sweep(by_wga, [TUNING_SEED], root / "tau", TAUS, common=common)

    # Step 5: where ERM and GERNE fail, by tissue ratio (experiment 1).
    error_vs_tissue_ratio.error_vs_tissue_ratio(
        [runs / grid.run_name(s, TUNING_SEED) for s in by_wga if s.family != "resample"],
        root / "error_vs_tissue_ratio")
    write_report(root)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
