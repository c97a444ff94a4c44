"""Open question 2: the tissue ratio as a continuous attribute, without one binarisation.

  python -m experiments.continuous_attribute --root runs/continuous      # about 30 min on 2 CPU cores
  python -m experiments.continuous_attribute --root runs/continuous --bins 3 4 5 6 --seeds 0 1 2

On synthetic `sections` slides tiled at 64 pixels (`--patch-size`; `experiments.patch_size`'s data
step, in `ROOT/slides` and `ROOT/data_p64`), these runs train in `ROOT/runs/` (resumable, `experiments.grid`):
- GERNE and group resampling (`configs/demo.py` settings) on A = 3, 4, 5 tissue-ratio bins
  (`--bins`): `data.taus` are the quantiles at 1/A, ..., (A-1)/A of the tissue ratio of the training
  split, both classes pooled (so the bins hold about equal shares of all training patches; tied
  quantiles are merged, which can leave fewer bins: the table gives the taus used);
- the same two on the paper's single threshold tau = 0.1 (A = 2), for reference;
- `ratio_weighted`: class-balanced batches drawn with weight 1 / (kernel density of the tissue ratio
  within the class), no bins at all (`gerne_jax.methods.ratio_weighted`, `method.ratio_weighted.bandwidth`);
- ERM.
Each run's checkpoint is chosen on validation WGA at its own groups (the taus it trained with; ERM and
ratio_weighted: tau = 0.1) and evaluated on the test split at the paper's thresholds 0.03, 0.1 and 0.2,
each its own binary attribute (`evaluate.evaluate_run(..., taus_list=...)`, cached in `ROOT/eval/`).
Every run sets `method.empty_group = "drop"` (a quantile bin can miss a class on small data). Writes
`ROOT/results.md`, `ROOT/results.csv` (mean and std over seeds) and `ROOT/continuous_attribute.png`.
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import grid, patch_size
from experiments.grid import Setting
from experiments.tables import markdown_table, over_seeds
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate
from gerne_jax.runs import run_log

BINS = (3, 4, 5)
PAPER_TAUS = (0.03, 0.1, 0.2)
REFERENCE_TAUS = (0.1,)  # the binary attribute of the papers and the demo
METHODS = ("erm", "ratio_weighted", "gerne", "resample")
BINNED = ("gerne", "resample")  # the methods trained on the quantile bins
PATCH_SIZE = 64
TAUS_KEY = "data.taus"


def quantile_taus(tissue_ratio: np.ndarray, bins: int) -> tuple[float, ...]:
    """Thresholds at the quantiles 1/bins, ..., (bins-1)/bins of `tissue_ratio` (numpy's default, linear).

    Tied quantiles are merged and a threshold at the smallest ratio dropped (its lowest bin would be
    empty), so there may be fewer than `bins - 1`; an InputError if none is left.
    """
    if bins < 2:
        raise InputError(f"--bins must be >= 2 each, got {bins}")
    ratio = np.asarray(tissue_ratio, np.float64)
    levels = np.arange(1, bins) / bins
    taus = np.unique(np.quantile(ratio, levels))
    taus = taus[taus > ratio.min()]
    if taus.size == 0:
        raise InputError(f"the training split's tissue ratios give no threshold for {bins} quantile bins "
                         "(too few distinct values)")
    return tuple(float(t) for t in taus)


def variants(methods: Sequence[str], train_ratio: np.ndarray, bins: Sequence[int]) -> list[dict[str, Any]]:
    """The study's runs: label, Setting, and the bins each was trained on."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"--methods {unknown}: choose among {list(METHODS)}")
    out = []
    for method in methods:
        if method not in BINNED:
            out.append({"method": method, "attribute": "tau 0.1 (selection only)" if method == "erm"
                        else "continuous (selection at tau 0.1)", "taus": REFERENCE_TAUS,
                        "setting": Setting(method)})
            continue
        out.append({"method": method, "attribute": "A = 2, tau 0.1", "taus": REFERENCE_TAUS,
                    "setting": Setting(method, {TAUS_KEY: REFERENCE_TAUS})})
        for a in bins:
            taus = quantile_taus(train_ratio, a)
            out.append({"method": method, "attribute": f"A = {len(taus) + 1} quantile bins (asked {a})",
                        "taus": taus, "setting": Setting(method, {TAUS_KEY: taus})})
    # Two bin counts can give the same taus (ties): one run each.
    return list({v["setting"]: v for v in out}.values())


def evaluate_cached(workdir: pathlib.Path, out: pathlib.Path, split_cache: dict[str, Any]) -> dict[str, Any]:
    """The run's best_wga checkpoint on the test split at each paper tau; cached while the run is unchanged."""
    stamp = (workdir / run_log.METRICS_FILE).stat().st_mtime_ns
    path = out / f"{workdir.name}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached["stamp"] == stamp:
            return cached
    result = evaluate.evaluate_run(workdir, "best_wga", "test", taus_list=[(t,) for t in PAPER_TAUS],
                                     split_cache=split_cache)
    figures = {"stamp": stamp, "step": int(result.checkpoint_meta["step"])}
    for tau in PAPER_TAUS:
        report = result.reports[evaluate.tau_key((tau,))]
        figures[f"WGA {tau:g}"] = float(report["worst_group_accuracy"])
        figures["BCA"] = float(report["balanced_class_accuracy"])
    files.write_text_atomic(path, json.dumps(figures))
    return figures


def plot(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    """Test WGA (mean, std over seeds) at each paper tau, one bar per run variant."""
    fig, axis = files.new_figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    width = 0.8 / len(PAPER_TAUS)
    for i, tau in enumerate(PAPER_TAUS):
        axis.bar(np.arange(len(rows)) + (i - (len(PAPER_TAUS) - 1) / 2) * width,
                 [row[f"test WGA {tau:g} mean"] for row in rows], width,
                 yerr=[np.nan_to_num(row[f"test WGA {tau:g} std"]) for row in rows], capsize=2,
                 label=f"tau = {tau:g}")
    axis.set_xticks(np.arange(len(rows)), [f"{row['method']}\n{row['attribute'].split(' (')[0]}" for row in rows],
                    fontsize=7)
    axis.set_ylabel("test WGA (checkpoint: validation WGA)")
    axis.set_ylim(0, 1)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)


def continuous_attribute_study(root: str | pathlib.Path, *, bins: Sequence[int] = BINS,
                               methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1),
                               data: patch_size.DataSize = patch_size.DEFAULT, patch: int = PATCH_SIZE,
                               overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Data, training and evaluation of every variant; writes the table and the plot; returns the rows."""
    root = pathlib.Path(root)
    data_dir = patch_size.tile(patch_size.make_slides(root, data), root / f"data_p{patch}", patch)
    train_ratio = dataset.read_patch_table(data_dir, "train")["tissue_ratio"]
    chosen = variants(methods, train_ratio, bins)
    common = {"data.dir": str(data_dir), "training.steps": data.steps, "method.empty_group": "drop",
              **(overrides or {})}
    if TAUS_KEY in common:
        raise InputError(f"--set must not set {TAUS_KEY}: the study sets each run's thresholds")
    runs = root / "runs"
    configs = {runs / grid.run_name(v["setting"], seed): grid.run_config(v["setting"], seed, common)
               for v in chosen for seed in seeds}
    print(f"{len(chosen)} variants x {len(seeds)} seeds = {len(configs)} runs in {runs}", flush=True)
    grid.train_all(configs)

    split_cache: dict[str, Any] = {}
    rows = []
    with grid.claim(root / "eval", wait=True):
        for v in chosen:
            figures = [evaluate_cached(runs / grid.run_name(v["setting"], seed), root / "eval", split_cache)
                       for seed in seeds]
            row = {"method": v["method"], "attribute": v["attribute"],
                   "taus": "+".join(repr(t) for t in v["taus"]), "run": v["setting"].name}
            for key in [f"WGA {tau:g}" for tau in PAPER_TAUS] + ["BCA"]:
                row[f"test {key} mean"], row[f"test {key} std"] = over_seeds([f[key] for f in figures])
            rows.append(row)
    with files.atomic_write(root / "results.csv") as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, root / "continuous_attribute.png")
    table = markdown_table([
        {"method": r["method"], "trained on": r["attribute"],
         "taus": ", ".join(f"{float(t):.4g}" for t in r["taus"].split("+")),
         **{f"test WGA tau {tau:g}": f"{r[f'test WGA {tau:g} mean']:.3f} ± {r[f'test WGA {tau:g} std']:.3f}"
            for tau in PAPER_TAUS},
         "test BCA": f"{r['test BCA mean']:.3f} ± {r['test BCA std']:.3f}"} for r in rows])
    files.write_text_atomic(root / "results.md", "\n".join([
        "# A continuous attribute: quantile bins and density weighting (synthetic `sections` slides)", "",
        f"{data.slides} slides of {data.size} pixels (data seed {data.seed}), {patch}-pixel patches. "
        "Quantile thresholds from the training split's tissue ratios, both classes pooled. Test WGA at each "
        "of the paper's thresholds (binary attribute 1[r >= tau]); checkpoint chosen on validation WGA at "
        f"the run's own groups; mean ± std over seeds {', '.join(map(str, seeds))}. "
        f"{grid.describe([v['setting'] for v in chosen], seeds, common)}", "",
        table, "", "![test WGA per tau](continuous_attribute.png)", ""]))
    print(f"\n{table}\n\nwrote {root / 'results.md'}, results.csv, continuous_attribute.png")
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--bins", type=int, nargs="+", default=list(BINS), help="A: quantile bins per run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slides", type=int, default=patch_size.DataSize.slides)
    parser.add_argument("--size", type=int, default=patch_size.DataSize.size, help="nominal slide side in pixels")
    parser.add_argument("--data-seed", type=int, default=patch_size.DataSize.seed)
    parser.add_argument("--steps", type=int, default=patch_size.DataSize.steps, help="training steps of every run")
    parser.add_argument("--patch-size", type=int, default=PATCH_SIZE)
    parser.add_argument("--set", default="", help="overrides of every run (as in grid.py; not tau)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a minutes-long check: {patch_size.SMOKE}, one seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = (patch_size.SMOKE if args.smoke
            else patch_size.DataSize(args.slides, args.size, args.data_seed, args.steps))
    continuous_attribute_study(args.root, bins=args.bins, methods=args.methods,
                               seeds=args.seeds[:1] if args.smoke else args.seeds, data=data,
                               patch=args.patch_size, overrides=grid.parse_overrides(args.set))
    return 0


if __name__ == "__main__":
    grid.run_script(main)
