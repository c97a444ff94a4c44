"""The comparison table: ERM, resampling, GERNE, GroupDRO, JTT, DFR and GERNE on pseudo-groups.

    python -m experiments.comparison --root runs/comparison                  # tune on seed 0, then 3 seeds
    python -m experiments.comparison --root runs/comparison_data1 --data-seed 1 --size 3072 \
        --settings-from runs/comparison/chosen.json                          # another data set, no tuning

Steps (resumable: finished runs are skipped, interrupted ones resume; see experiments/grid.py):
1. data: `--slides` synthetic slides of the `sections` layout (both minority groups hard; docs/data.md
   "Built-in synthetic slides"), 64-pixel patches, tau = 0.1.
2. tuning on seed 0, the same budget for every method (`TUNING_BUDGET` settings each), all on the
   tiny ResNet with GroupNorm: one network and normalisation for every row. Each method's setting is
   chosen on validation WGA only (`best_wga` checkpoints); `ROOT/chosen.json` records the choice.
   The runs other methods build on are trained first, per seed: JTT's identification runs (ERM at
   `ERM_LR` for T steps), DFR's base runs (ERM's tuning runs at two learning rates) and the scoring
   run of GERNE with unknown attributes (ERM at `ERM_LR` / 10, weight decay x 2; docs/methods.md "GERNE with
   unknown attributes"). DFR fits its last layer on half of the validation split and is selected on
   the other half (docs/methods.md "DFR"); the others only select on validation.
3. seeds: every chosen setting with seeds 0, 1, 2 (`--seeds`); test mean and standard deviation.
4. the best network of a method where it differs: GERNE with BatchNorm statistics shared by its two
   batches and precise BatchNorm (the demo's GERNE), over the same seeds, reported in its own table.
5. per-group test accuracies (mean over seeds) and the error rate against tissue ratio (seed 0).

`--settings-from CHOSEN.json` skips step 2 and trains the settings chosen on another data set: the
check that a finding does not depend on one generated data set. Writes `ROOT/results.md`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import stats
from experiments import error_vs_tissue_ratio, grid, patch_size
from experiments.grid import Setting
from experiments.tables import markdown_table, mean_std, over_seeds
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.methods import pseudo_groups

LR = "optimizer.learning_rate"
TAU = 0.1
SEEDS = (0, 1, 2)
TUNING_SEED = 0
TUNING_BUDGET = 4  # settings tried per method on the tuning seed
ERM_LR = 0.1  # configs/demo.py's ERM learning rate: the identification runs of JTT train at it
IDENTIFICATION_STEPS = (300, 600)  # JTT's T, the identification run's steps (of the demo's 1,500)
FAMILIES = ("erm", "resample", "gerne", "group_dro", "jtt", "dfr", "gerne_pseudo")
SCORING = Setting("erm_scoring", {LR: ERM_LR / 10})  # configs/demo.py's switch: weight decay x 2
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3)


def identification_setting(steps: int) -> Setting:
    """JTT's identification run: ERM at `ERM_LR` for T steps (its latest checkpoint is step T)."""
    return Setting("erm", {LR: ERM_LR, "training.steps": steps})


def run_template(setting: Setting, runs: pathlib.Path) -> str:
    """The folder of `setting`'s run under `runs` for any seed (`{seed}`: see experiments/grid.py)."""
    return str(runs / grid.run_name(setting, grid.SEED_PLACEHOLDER))


def tuning_settings(runs: pathlib.Path, identification_steps: Sequence[int]) -> dict[str, list[Setting]]:
    """Per method, the `TUNING_BUDGET` settings tuning tries."""
    identification = {steps: run_template(identification_setting(steps), runs) for steps in identification_steps}
    families = {
        "erm": [Setting("erm", {LR: lr}) for lr in LEARNING_RATES],
        "resample": [Setting("resample", {LR: lr}) for lr in LEARNING_RATES],
        "gerne": [Setting("gerne", {"method.c": c, "method.beta": beta, LR: ERM_LR})
                  for c, beta in ((0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0))],
        "group_dro": [Setting("group_dro", {"method.group_dro.eta": eta, LR: lr})
                      for eta in (0.01, 0.1) for lr in (0.03, 0.1)],
        "jtt": [Setting("jtt", {"method.jtt.identification_workdir": identification[steps],
                                "method.jtt.upweight": upweight, LR: ERM_LR})
                for steps in identification_steps for upweight in (5.0, 20.0)],
        "dfr": [Setting("dfr", {"method.dfr.base_workdir": run_template(Setting("erm", {LR: lr}), runs),
                                "method.dfr.base_checkpoint": checkpoint})
                for lr in (0.03, ERM_LR) for checkpoint in ("best_bca", "latest")],
        "gerne_pseudo": [Setting("gerne_pseudo", {"method.beta": beta, LR: ERM_LR,
                                                  "method.pseudo_groups.scoring_workdir": run_template(SCORING, runs),
                                                  "method.pseudo_groups.fraction": fraction})
                         for fraction in (0.1, 0.2) for beta in (0.5, 1.0)],
    }
    assert all(len(settings) == TUNING_BUDGET for settings in families.values())
    return families


def prerequisites(settings: Sequence[Setting], runs: pathlib.Path,
                  identification_steps: Sequence[int]) -> list[Setting]:
    """The runs `settings` build on (the `{seed}` folders under `runs` they name), to train first."""
    candidates = [*(Setting("erm", {LR: lr}) for lr in LEARNING_RATES), SCORING,
                  *(identification_setting(steps) for steps in identification_steps)]
    by_folder = {run_template(s, runs): s for s in candidates}
    needed = dict.fromkeys(value for setting in settings for value in setting.overrides.values()
                           if isinstance(value, str) and value.startswith(str(runs)))
    unknown = [folder for folder in needed if folder not in by_folder]
    if unknown:
        raise ValueError(f"settings build on runs this comparison does not train: {unknown} (JTT's T values "
                         "are --identification-steps)")
    return [by_folder[folder] for folder in needed]


def best_network_settings() -> list[Setting]:
    """The demo's GERNE: BatchNorm statistics shared by the two batches, precise BatchNorm."""
    return [Setting("gerne", {"model.norm": "shared"})]


def make_data(root: pathlib.Path, slides: int, size: int, data_seed: int) -> pathlib.Path:
    """Step 1: `sections` slides and 64-pixel patches (the studies' data steps, safe for several
    processes), then the group counts and the tissue-ratio plot once."""
    manifest = patch_size.make_slides(root, patch_size.DataSize(slides=slides, size=size, seed=data_seed))
    data = root / "data"
    tiled_before = (data / "metadata.json").is_file()
    patch_size.tile(manifest, data, 64)
    if not tiled_before:
        table = dataset.read_patch_table(data)
        print(stats.format_group_counts(stats.split_group_counts(table, TAU), TAU))
        stats.plot_tissue_ratio(table, (TAU,), data / stats.PLOT_FILE)
    return data


def train_prerequisites(settings: Sequence[Setting], seeds: Sequence[int], runs: pathlib.Path,
                        common: Mapping[str, Any], identification_steps: Sequence[int]) -> None:
    grid.train_all({runs / grid.run_name(s, seed): grid.run_config(s, seed, common)
                    for s in prerequisites(settings, runs, identification_steps) for seed in seeds})


def save_chosen(path: pathlib.Path, settings: Sequence[Setting], runs: pathlib.Path) -> None:
    """The chosen settings, with other runs' folders relative to the runs folder (portable)."""
    document = [{"method": s.method, "overrides": {k: v.replace(str(runs), "{runs}") if isinstance(v, str) else v
                                                   for k, v in s.overrides.items()}} for s in settings]
    files.write_text_atomic(path, json.dumps(document, indent=2))


def load_chosen(path: pathlib.Path, runs: pathlib.Path) -> list[Setting]:
    return [Setting(entry["method"], {k: v.replace("{runs}", str(runs)) if isinstance(v, str) else v
                                      for k, v in entry["overrides"].items()})
            for entry in json.loads(pathlib.Path(path).read_text())]


def group_accuracy_rows(results_dir: pathlib.Path, settings: Sequence[Setting],
                        seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per method, each group's test accuracy (mean over seeds) of its `best_wga` checkpoints."""
    path = results_dir / "eval" / "best_wga_test.json"
    evaluated = json.loads(path.read_text())
    missing = [grid.run_name(s, seed) for s in settings for seed in seeds if grid.run_name(s, seed) not in evaluated]
    if missing:  # the folder holds the last evaluation only: a process with other --seeds rewrote it
        raise InputError(f"{path} has no evaluation of {', '.join(missing)}: another process sharing "
                         f"{results_dir.parent} with other --seeds evaluated after this one; run the comparison "
                         "once more with every seed (finished runs are reused)")
    rows = []
    for setting in settings:
        reports = [evaluated[grid.run_name(setting, seed)]["results"][f"tau={TAU:g}"] for seed in seeds]
        accuracy = np.mean([r["group_accuracy"] for r in reports], axis=0)
        counts, bins = reports[0]["group_count"], reports[0]["bin_names"]
        row = {"method": setting.family}
        for y, class_name in enumerate(dataset.CLASS_NAMES):
            for a, bin_name in enumerate(bins):
                row[f"{class_name}, {bin_name} (n={counts[y][a]})"] = f"{accuracy[y][a]:.3f}"
        rows.append(row)
    return rows


def pseudo_minority_rows(runs: pathlib.Path, settings: Sequence[Setting],
                         seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Precision and recall of the pseudo-minority against the true minority groups (overall and per
    class, mean ± std over seeds), read from the pseudo-group runs' `pseudo_groups.json`."""
    rows = []
    for setting in (s for s in settings if s.family == "gerne_pseudo"):
        reports = [json.loads((runs / grid.run_name(setting, seed) / pseudo_groups.REPORT_FILE).read_text())
                   for seed in seeds]
        parts = {"overall": [r["overall"] for r in reports],
                 **{name: [r["per_class"][name] for r in reports] for name in dataset.CLASS_NAMES}}
        for part, values in parts.items():
            row = {"setting": f"t = {setting.overrides['method.pseudo_groups.fraction']:g}, "
                              f"beta = {setting.overrides['method.beta']:g}", "examples": part}
            for metric in ("precision", "recall"):
                mean, std = over_seeds([v[metric] for v in values])
                row[metric] = f"{mean:.3f} ± {std:.3f}"
            rows.append(row)
    return rows


def summary_rows(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"method": e["family"], "chosen setting (val WGA)": e["chosen setting"], "seeds": e["seeds"],
             **{f"{prefix} {metric}": mean_std(e, f"{prefix} {metric}", decimals=3)
                for prefix in ("test", "val") for metric in ("WGA", "BCA")}}
            for e in summary if e["checkpoint"] == "best_wga"]


def write_report(root: pathlib.Path, args: argparse.Namespace, chosen: Sequence[Setting],
                 summary: Sequence[Mapping[str, Any]], best_network: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    table = summary_rows(summary)
    erm = next(e for e in summary if e["family"] == "erm" and e["checkpoint"] == "best_wga")

    def points(a: Mapping[str, Any], a_metric: str, b: Mapping[str, Any], b_metric: str) -> str:
        return f"{100 * (a[f'test {a_metric} mean'] - b[f'test {b_metric} mean']):+.1f}"

    differences = [f"- ERM: test BCA - test WGA = {points(erm, 'BCA', erm, 'WGA')} points."]
    differences += [f"- {e['family']} - ERM: test WGA {points(e, 'WGA', erm, 'WGA')} points, test BCA "
                    f"{points(e, 'BCA', erm, 'BCA')} points."
                    for e in summary if e["checkpoint"] == "best_wga" and e["family"] != "erm"]
    tuning = ("settings chosen on another data set: " + str(args.settings_from) if args.settings_from else
              f"tuned on seed {TUNING_SEED}, {TUNING_BUDGET} settings per method, on validation WGA only "
              "([tuning/results.md](tuning/results.md))")
    lines = [
        "# Comparison on the `sections` synthetic slides", "",
        f"Data: {args.slides} slides of about {args.size} pixels, data seed {args.data_seed}, 64-pixel patches, "
        f"tau = {TAU:g}. Tiny ResNet with GroupNorm for every method; {tuning}. Test split, mean ± standard "
        f"deviation over seeds {', '.join(map(str, args.seeds))}, `best_wga` checkpoints.", "",
        markdown_table(table), "", "![test WGA and BCA](seeds/summary.png)", "",
        "## Differences", "", *differences, "",
        "## Per-group test accuracy (mean over seeds)", "",
        markdown_table(group_accuracy_rows(root / "seeds", chosen, args.seeds)), "",
        "## GERNE on pseudo-groups: the pseudo-minority against the true minority groups (training split)", "",
        markdown_table(pseudo_minority_rows(root / "runs", chosen, args.seeds)), "",
        "## Best network where it differs: GERNE with shared BatchNorm and precise BatchNorm", "",
        markdown_table(summary_rows(best_network)), "",
        f"## Error rate against tissue ratio (seed {args.seeds[0]})", "",
        "![error rate against tissue ratio](error_vs_tissue_ratio/error_vs_tissue_ratio.png)", ""]
    files.write_text_atomic(root / "results.md", "\n".join(lines))
    print("\n".join(lines[:6] + differences))
    return root / "results.md"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=pathlib.Path)
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--settings-from", type=pathlib.Path, default=None,
                        help="chosen.json of another comparison: train those settings, no tuning")
    parser.add_argument("--identification-steps", type=int, nargs="+", default=list(IDENTIFICATION_STEPS),
                        help="JTT's T values tried in tuning")
    parser.add_argument("--set", default="", help="overrides of every run, e.g. steps=300 (a quick look)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root
    data = make_data(root, args.slides, args.size, args.data_seed)
    runs = root / "runs"
    common = {"data.dir": str(data), "data.taus": (TAU,), "model.norm": "group", **grid.parse_overrides(args.set)}
    if args.settings_from:
        chosen = load_chosen(args.settings_from, runs)
    else:
        families = tuning_settings(runs, args.identification_steps)
        settings = [s for family in FAMILIES for s in families[family]]
        train_prerequisites(settings, [TUNING_SEED], runs, common, args.identification_steps)
        summary = grid.run_grid(settings, [TUNING_SEED], runs, common=common, out=root / "tuning")
        chosen = grid.chosen_settings(summary, settings)["best_wga"]
    save_chosen(root / "chosen.json", chosen, runs)
    train_prerequisites(chosen, args.seeds, runs, common, args.identification_steps)
    summary = grid.run_grid(chosen, args.seeds, runs, common=common, out=root / "seeds")
    best_network = grid.run_grid(best_network_settings(), args.seeds, runs, common=common, out=root / "best_network")
    error_vs_tissue_ratio.error_vs_tissue_ratio([runs / grid.run_name(s, args.seeds[0]) for s in chosen],
                                                root / "error_vs_tissue_ratio")
    write_report(root, args, chosen, summary, best_network)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
