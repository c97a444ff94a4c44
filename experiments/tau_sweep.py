"""The papers' second experiment: group sizes and tuned ERM / resampling / GERNE WGA for each tau.

  python -m experiments.tau_sweep --root runs/tau --tau 0.03 0.1 0.2 --seeds 0 --set steps=1500 \
      --runs erm,lr=0.01 resample,lr=0.01 gerne,beta=1,lr=0.01

For each tau, `experiments/grid.py` trains the runs with `tau=<tau>` appended to their presets in
`ROOT/tau<tau>/` (resumable, tuned on validation WGA at that tau). Then this writes
`ROOT/results.md` (training-split group sizes per tau, then each family's tuned test WGA and BCA,
mean and standard deviation over seeds, checkpoint chosen by validation WGA) and
`ROOT/wga_vs_tau.png`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_pipeline import stats  # noqa: E402
from experiments import grid  # noqa: E402
from gerne_jax import experiment, files, reports  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--tau", type=float, nargs="+", default=[0.03, 0.1, 0.2])
    parser.add_argument("--runs", nargs="+", required=True, help="configs/demo.py arguments (see grid.py)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", default="", help="presets appended to every run (not tau)")
    parser.add_argument("--skip-training", action="store_true")
    return parser.parse_args(argv)


def tau_root(root: pathlib.Path, tau: float) -> pathlib.Path:
    return root / f"tau{tau:g}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.root)
    if "tau=" in args.set:
        raise SystemExit("error: --set must not hold tau; give the thresholds with --tau")
    summaries, group_tables = {}, []
    for tau in args.tau:
        extra = ",".join(filter(None, [args.set, f"tau={tau:g}"]))
        grid_args = ["--root", str(tau_root(root, tau)), "--seeds", *map(str, args.seeds), "--set", extra,
                     "--runs", *args.runs, *(["--skip-training"] if args.skip_training else [])]
        if grid.main(grid_args) != 0:
            return 1
        summaries[tau] = [entry for entry in json.loads((tau_root(root, tau) / "summary.json").read_text())
                          if entry["checkpoint"] == "best_wga"]
        data_dir = experiment.load_config(tau_root(root, tau) / grid.run_name(args.runs[0], args.seeds[0])).data.dir
        table = stats.read_patch_table(data_dir)
        group_tables.append(stats.format_group_counts(stats.split_group_counts(table, tau), tau))

    families = list(dict.fromkeys(entry["family"] for entries in summaries.values() for entry in entries))
    rows = [{"tau": f"{tau:g}", **{f"{e['family']} {metric}": f"{e[f'test {metric} mean']:.4f} ± {e[f'test {metric} std']:.4f}"
                                   for e in entries for metric in ("WGA", "BCA")},
             **{f"{e['family']} setting": e["chosen setting"] for e in entries}}
            for tau, entries in summaries.items()]

    fig, axis = plt.subplots(figsize=(5.5, 3.8))
    for name in families:
        means = [next(e for e in summaries[tau] if e["family"] == name)["test WGA mean"] for tau in args.tau]
        stds = [next(e for e in summaries[tau] if e["family"] == name)["test WGA std"] for tau in args.tau]
        axis.errorbar(args.tau, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, label=name)
    axis.set_xlabel("tissue-ratio threshold tau")
    axis.set_ylabel("test WGA (selected by validation WGA)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    reports.save_figure(fig, root / "wga_vs_tau.png")

    command = " ".join(["python -m experiments.tau_sweep", *(sys.argv[1:] if argv is None else argv)])
    files.write_text_atomic(root / "results.md", "\n".join([
        "# WGA against the tissue-ratio threshold tau (synthetic data), test split", "",
        f"Reproduce: `{command}`", "", "Each family tuned on validation WGA at its tau; mean ± std over seeds "
        "(nan with one seed). Every run: `tau<tau>/results.md`.", "",
        grid.markdown_table(rows), "", "![WGA against tau](wga_vs_tau.png)", "", "## Group sizes", "",
        *(f"```\n{table}\n```\n" for table in group_tables)]))
    print(f"\n{grid.markdown_table(rows)}\n\nwrote {root / 'results.md'} and wga_vs_tau.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
