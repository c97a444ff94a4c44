"""The papers' first experiment: error rate against tissue ratio per class, where minority groups fail.

  python -m experiments.error_vs_tissue_ratio --runs runs/grid/erm_lr0.01_seed0 runs/grid/gerne_..._seed0 \
      --out runs/error_vs_tissue_ratio [--checkpoint best_wga] [--split test] [--bins 10]

Evaluates each run (evaluate.py's `evaluate_run`: same checkpoint restore and prediction) and writes
`OUT/results.md` (per class and tissue-ratio bin: patch count and each run's error rate),
`OUT/results.json` and `OUT/error_vs_tissue_ratio.png`. Run from the repository root.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from absl import logging as absl_logging

import evaluate
from experiments import grid
from gerne_jax import files, reports


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="train.py workdirs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default="best_wga")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--bins", type=int, default=10, help="equal-width tissue-ratio bins over [0, 1]")
    parser.add_argument("--tau", type=float, nargs="*", default=[0.03, 0.1, 0.2], help="lines drawn on the plot")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about read-only managers
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split_cache: dict = {}
    outputs = {}
    for workdir in map(pathlib.Path, args.runs):
        probabilities, split, meta = evaluate.evaluate_run(workdir, args.checkpoint, args.split, None, split_cache)
        outputs[workdir.name] = (split["label"], probabilities, split["tissue_ratio"], meta["step"])

    rows, document = [], {}
    for name, (label, probabilities, tissue_ratio, step) in outputs.items():
        edges, counts, rates = reports.error_rate_by_tissue_ratio(label, probabilities, tissue_ratio, args.bins)
        document[name] = {"checkpoint": args.checkpoint, "checkpoint_step": step, "bin_edges": edges.tolist(),
                          "count": counts.tolist(), "error_rate": rates.tolist()}
    names = list(document)
    first = document[names[0]]
    for y, class_name in enumerate(reports.CLASS_NAMES):
        for b in range(args.bins):
            rows.append({"class": class_name, "tissue ratio": f"[{first['bin_edges'][b]:.1f}, {first['bin_edges'][b + 1]:.1f})",
                         "patches": first["count"][y][b],
                         **{f"{name} error": (f"{document[name]['error_rate'][y][b]:.3f}"
                                              if first["count"][y][b] else "-") for name in names}})

    reports.plot_error_by_tissue_ratio({name: value[:3] for name, value in outputs.items()},
                                       out / "error_vs_tissue_ratio.png", taus=args.tau)
    files.write_text_atomic(out / "results.json", json.dumps(document, indent=2, allow_nan=True))
    command = " ".join(["python -m experiments.error_vs_tissue_ratio", *(sys.argv[1:] if argv is None else argv)])
    files.write_text_atomic(out / "results.md", "\n".join([
        f"# Error rate against tissue ratio per class (synthetic data), {args.split} split", "",
        f"Reproduce: `{command}`", "", f"Checkpoint `{args.checkpoint}` of each run (chosen on validation); "
        "the last bin includes tissue ratio 1.", "", grid.markdown_table(rows), "",
        "![error rate against tissue ratio](error_vs_tissue_ratio.png)", ""]))
    print(f"{grid.markdown_table(rows)}\n\nwrote {out / 'results.md'} and error_vs_tissue_ratio.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
