"""The papers' first experiment: error rate against tissue ratio per class, where minority groups fail.

    error_vs_tissue_ratio(["runs/grid/erm_lr0.1_seed0", "runs/grid/gerne_..._seed0"], "runs/error_vs_tissue")

or `python -m experiments.error_vs_tissue_ratio --runs RUN... --out OUT [--checkpoint best_wga]
[--split test] [--bins 10]`. Evaluates each run with `gerne_jax.evaluation.evaluate.evaluate_run` (the checkpoint
restore and prediction of evaluate.py) and writes `OUT/results.md` (per class and tissue-ratio bin:
patch count and each run's error rate), `OUT/results.json` and `OUT/error_vs_tissue_ratio.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
from collections.abc import Sequence

from experiments import grid
from experiments.tables import markdown_table
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate, reports


def error_vs_tissue_ratio(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                          checkpoint: str = "best_wga", split: str = "test", bins: int = 10,
                          taus: Sequence[float] = (0.03, 0.1, 0.2)) -> pathlib.Path:
    """Writes the tables and the plot for `runs` (taus: lines on the plot); returns results.md's path."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split_cache: dict = {}
    workdirs = [pathlib.Path(run) for run in runs]
    evaluations = {name: evaluate.evaluate_run(workdir, checkpoint, split, split_cache=split_cache)
                   for name, workdir in zip(evaluate.run_names(workdirs), workdirs)}
    curves = {name: (e.split["label"], e.probabilities, e.split["tissue_ratio"])
              for name, e in evaluations.items()}

    document = {}
    for name, e in evaluations.items():
        edges, counts, rates = reports.error_rate_by_tissue_ratio(*curves[name], bins)
        document[name] = {"checkpoint": checkpoint, "checkpoint_step": int(e.checkpoint_meta["step"]),
                          "bin_edges": edges.tolist(), "count": counts.tolist(), "error_rate": rates.tolist()}
    names = list(document)
    first = document[names[0]]
    rows = []
    for y, class_name in enumerate(dataset.CLASS_NAMES):
        for b in range(bins):
            low, high = first["bin_edges"][b], first["bin_edges"][b + 1]
            rows.append({"class": class_name, "tissue ratio": f"[{low:.1f}, {high:.1f})",
                         "patches": first["count"][y][b],
                         **{f"{name} error": (f"{document[name]['error_rate'][y][b]:.3f}"
                                              if first["count"][y][b] else "-") for name in names}})

    reports.plot_error_by_tissue_ratio(curves, out / "error_vs_tissue_ratio.png", taus=taus)
    files.write_text_atomic(out / "results.json", json.dumps(document, indent=2, allow_nan=True))
    files.write_text_atomic(out / "results.md", "\n".join([
        f"# Error rate against tissue ratio per class (synthetic data), {split} split", "",
        f"Runs: {', '.join(f'`{workdir}`' for workdir in workdirs)}.", "",
        f"Checkpoint `{checkpoint}` of each run (chosen on validation); the last bin includes tissue "
        "ratio 1.", "", markdown_table(rows), "",
        "![error rate against tissue ratio](error_vs_tissue_ratio.png)", ""]))
    print(f"{markdown_table(rows)}\n\nwrote {out / 'results.md'} and error_vs_tissue_ratio.png")
    return out / "results.md"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run workdirs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default="best_wga")
    parser.add_argument("--split", default="test", choices=dataset.SPLITS)
    parser.add_argument("--bins", type=int, default=10, help="equal-width tissue-ratio bins over [0, 1]")
    parser.add_argument("--tau", type=float, nargs="*", default=[0.03, 0.1, 0.2],
                        help="lines drawn on the plot")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    error_vs_tissue_ratio(args.runs, args.out, checkpoint=args.checkpoint, split=args.split, bins=args.bins,
                          taus=args.tau)
    return 0


if __name__ == "__main__":
    grid.run_script(main)
