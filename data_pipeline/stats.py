"""`gerne-jax stats`: group counts per split and tau, and the tissue-ratio distribution.

Reads `DATA_DIR/patches.csv` only (no pixels, `dataset.read_patch_table`). For each threshold tau the
attribute is `a = 1[tissue_ratio >= tau]` (docs/design.md §2, `dataset.attribute_from_tissue_ratio`) and
the groups are (label, a); the table gives each group's patches and share of its split. The PNG shows,
per split, the tissue-ratio histogram of each class with the tau lines.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset

PLOT_FILE = "tissue_ratio.png"
CLASS_COLOURS = ("#1f77b4", "#d62728")


def split_group_counts(table: dict[str, np.ndarray], tau: float) -> dict[str, np.ndarray]:
    """Split -> [2, 2] counts indexed (label, a) with a = 1[tissue_ratio >= tau], splits present only.

    `table`: `dataset.read_patch_table(data_dir)` (all splits, with the split column)."""
    counts = {}
    for split in dataset.SPLITS:
        chosen = table["split"] == split
        if chosen.any():
            attribute = dataset.attribute_from_tissue_ratio(table["tissue_ratio"][chosen], [tau])
            counts[split] = dataset.group_counts(table["label"][chosen], attribute,
                                                 len(dataset.CLASS_NAMES), 2)
    return counts


def format_group_counts(counts: dict[str, np.ndarray], tau: float) -> str:
    """One table: a row per split, a column per group, each cell `count (share of the split %)`."""
    groups = [(y, a) for y in range(len(dataset.CLASS_NAMES)) for a in (0, 1)]
    names = [f"{dataset.CLASS_NAMES[y]}, r {'>=' if a else '<'} {tau:g}" for y, a in groups]
    cells = {split: [f"{c[y, a]} ({100 * c[y, a] / max(c.sum(), 1):.1f}%)" for y, a in groups]
             for split, c in counts.items()}
    widths = [max(len(name), *(len(row[i]) for row in cells.values())) for i, name in enumerate(names)]
    first = max(len("split"), *(len(s) for s in cells))
    lines = [f"tau = {tau:g}   (a = 1[tissue_ratio >= tau]; cells: patches (share of the split))",
             "split".ljust(first) + "".join(f"  {n:>{w}}" for n, w in zip(names, widths)) + "  total"]
    for split, row in cells.items():
        lines.append(split.ljust(first) + "".join(f"  {cell:>{w}}" for cell, w in zip(row, widths))
                     + f"  {counts[split].sum()}")
    return "\n".join(lines)


def plot_tissue_ratio(table: dict[str, np.ndarray], taus: Sequence[float], path: str | os.PathLike) -> None:
    """Histogram of tissue ratio per class, one panel per split, tau as dashed lines (PNG)."""
    splits = [s for s in dataset.SPLITS if (table["split"] == s).any()]
    figure, axes = files.new_figure(1, max(len(splits), 1), figsize=(4.5 * max(len(splits), 1), 3.6),
                                squeeze=False, dpi=120)
    bins = np.linspace(0.0, 1.0, 41)
    for axis, split in zip(axes[0], splits):
        chosen = table["split"] == split
        for label, (name, colour) in enumerate(zip(dataset.CLASS_NAMES, CLASS_COLOURS)):
            ratios = table["tissue_ratio"][chosen & (table["label"] == label)]
            axis.hist(ratios, bins=bins, histtype="step", color=colour, linewidth=1.5,
                      label=f"{name} ({ratios.size})")
        for tau in taus:
            axis.axvline(tau, color="0.3", linestyle="--", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_title(split)
        axis.set_xlabel("tissue ratio r")
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("patches (log)")
    figure.suptitle("tissue ratio per class; dashed: tau = " + ", ".join(f"{t:g}" for t in taus), fontsize=10)
    figure.tight_layout()
    files.save_figure(figure, path)


def run(args: argparse.Namespace) -> int:
    """Prints the tables and writes the plot; a missing or broken dataset raises `dataset.DatasetError`
    (one line, exit 2 under `run_command`), an out-of-range tau an InputError naming `--tau`."""
    bad = [tau for tau in args.tau if not 0.0 <= tau <= 1.0]
    if bad:
        raise InputError(f"--tau {bad}: thresholds must be within [0, 1] (tissue ratios are)")
    table = dataset.read_patch_table(args.data_dir)
    for tau in args.tau:
        print(format_group_counts(split_group_counts(table, tau), tau))
        print()
    out = args.out or args.data_dir / PLOT_FILE
    plot_tissue_ratio(table, args.tau, out)
    print(f"wrote {out}")
    return 0
