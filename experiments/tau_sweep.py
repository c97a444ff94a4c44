"""The papers' second experiment: group sizes and tuned ERM / resampling / GERNE WGA for each tau.

    tau_sweep([Setting("erm", {"optimizer.learning_rate": 0.1}), ...], seeds=[0], root="runs/tau",
              taus=[0.03, 0.1, 0.2], common={"training.steps": 1500})

or `python -m experiments.tau_sweep --root runs/tau --tau 0.03 0.1 0.2 --seeds 0 --set steps=1500
--runs erm,lr=0.1 resample,lr=0.03 gerne,c=0.5,beta=0.5,lr=0.1` (settings as in experiments/grid.py).

For each tau, `grid.run_grid` trains the settings with `data.taus = (tau,)` added to the common
overrides in `ROOT/tau<tau>/` (resumable, tuned on validation WGA at that tau). Then this writes
`ROOT/results.md` (training-split group sizes per tau, then each family's tuned test WGA and BCA,
mean and standard deviation over seeds, checkpoint chosen by validation WGA) and `ROOT/wga_vs_tau.png`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import stats
from experiments import grid
from experiments.tables import markdown_table, mean_std
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.runs import run_log

TAUS_KEY = "data.taus"


def tau_root(root: pathlib.Path, tau: float) -> pathlib.Path:
    return root / f"tau{tau:g}"


def plot_wga_vs_tau(summaries: Mapping[float, Sequence[Mapping[str, Any]]], path: pathlib.Path) -> None:
    """Each family's tuned test WGA (mean, std over seeds) against tau."""
    taus = list(summaries)
    families = list(dict.fromkeys(entry["family"] for entries in summaries.values() for entry in entries))
    fig, axis = files.new_figure(figsize=(5.5, 3.8))
    for name in families:
        entries = [next(e for e in summaries[tau] if e["family"] == name) for tau in taus]
        axis.errorbar(taus, [e["test WGA mean"] for e in entries],
                      yerr=[np.nan_to_num(e["test WGA std"]) for e in entries],
                      marker="o", capsize=3, label=name)
    axis.set_xlabel("tissue-ratio threshold tau")
    axis.set_ylabel("test WGA (selected by validation WGA)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    files.save_figure(fig, path)


def tau_sweep(settings: Sequence[grid.Setting], seeds: Sequence[int], root: str | os.PathLike,
              taus: Sequence[float], *, common: Mapping[str, Any] | None = None,
              skip_training: bool = False) -> list[dict[str, str]]:
    """Runs the grid at each tau and writes ROOT/results.md and the plot; returns the results table's rows."""
    root = pathlib.Path(root)
    common = dict(common or {})
    if TAUS_KEY in common or any(TAUS_KEY in setting.overrides for setting in settings):
        raise ValueError(f"the settings and common overrides must not set {TAUS_KEY}; "
                         "give the thresholds as taus")
    summaries, group_tables = {}, []
    for tau in taus:
        summary = grid.run_grid(settings, seeds, tau_root(root, tau), common={**common, TAUS_KEY: (tau,)},
                                skip_training=skip_training)
        summaries[tau] = [entry for entry in summary if entry["checkpoint"] == "best_wga"]
        first_run = tau_root(root, tau) / grid.run_name(settings[0], seeds[0])
        table = dataset.read_patch_table(run_log.read_config(first_run).data.dir)
        group_tables.append(stats.format_group_counts(stats.split_group_counts(table, tau), tau))

    rows = [{"tau": f"{tau:g}", **{f"{e['family']} {metric}": mean_std(e, f"test {metric}")
                                   for e in entries for metric in ("WGA", "BCA")},
             **{f"{e['family']} setting": e["chosen setting"] for e in entries}}
            for tau, entries in summaries.items()]
    plot_wga_vs_tau(summaries, root / "wga_vs_tau.png")
    files.write_text_atomic(root / "results.md", "\n".join([
        "# WGA against the tissue-ratio threshold tau (synthetic data), test split", "",
        grid.describe(settings, seeds, common), "",
        "Each family tuned on validation WGA at its tau; mean ± std over seeds (nan with one seed). "
        "Every run: `tau<tau>/results.md`.", "",
        markdown_table(rows), "", "![WGA against tau](wga_vs_tau.png)", "", "## Group sizes", "",
        *(f"```\n{table}\n```\n" for table in group_tables)]))
    print(f"\n{markdown_table(rows)}\n\nwrote {root / 'results.md'} and wga_vs_tau.png")
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--tau", type=float, nargs="+", default=[0.03, 0.1, 0.2])
    parser.add_argument("--runs", nargs="+", required=True,
                        help="settings, METHOD[,KEY=VALUE...] each (see grid.py)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", default="", help="overrides of every run (not tau)")
    parser.add_argument("--skip-training", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tau_sweep([grid.parse_setting(text) for text in args.runs], args.seeds, args.root, args.tau,
              common=grid.parse_overrides(args.set), skip_training=args.skip_training)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
