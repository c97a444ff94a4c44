"""Open question 1: how does the patch size change the tissue-amount shortcut, ERM's gap and GERNE's gain?

  python -m experiments.patch_size --root runs/patch_size          # about 30 min on 2 CPU cores
  python -m experiments.patch_size --root runs/patch_size --slides 24 --steps 1500 --seeds 0 1 2 3 4

The same synthetic slides (`sections` layout: both minority groups hard, `data_pipeline.synthetic`) are
tiled at each patch size P (stride P) into `ROOT/data_p<P>`. Per P this reports, on the training split
and at tau (0.1):
- the shortcut's strength: each class's minority share (tumour patches with r < tau among tumour
  patches, non-tumour patches with r >= tau among non-tumour patches, `data_pipeline.stats`) and the
  tissue-ratio gap between the classes (mean and median tissue ratio of tumour minus non-tumour);
- ERM's and GERNE's test WGA and BCA (mean, std over the seeds), each with its `configs/demo.py`
  setting and the checkpoint chosen on validation WGA (`experiments.grid.run_grid` in `ROOT/p<P>/`,
  runs in `ROOT/runs/p<P>/`); ERM's BCA - WGA gap and GERNE's WGA gain over ERM.
Every run sets `method.empty_group = "drop"`: large patches are few, and a group that happens to be
empty at some P is left out of GERNE's less-biased batch rather than stopping the study (the table's
`empty groups` column names them). Writes `ROOT/results.md`, `ROOT/results.csv` and `ROOT/patch_size.png`.
Resumable: tiled patch sizes, finished runs and up-to-date evaluations are skipped.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import stats, tile_manifest
from data_pipeline.synthetic import writing
from experiments import grid
from experiments.grid import Setting
from experiments.tables import markdown_table
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides.scan import TilingConfig

PATCH_SIZES = (32, 64, 128)
TAU = 0.1
LAYOUT = "sections"
SETTINGS = (Setting("erm"), Setting("gerne"))  # the demo's tuned settings
NON_TUMOUR, TUMOUR = (dataset.CLASS_NAMES.index(name) for name in ("non_tumour", "tumour"))


@dataclasses.dataclass(frozen=True)
class DataSize:
    """The synthetic slides of a study and the length of its runs."""

    slides: int = 8
    size: int = 2048
    seed: int = 0
    steps: int = 800


DEFAULT = DataSize()
SMOKE = DataSize(slides=3, size=512, steps=3)


def make_slides(root: pathlib.Path, data: DataSize) -> pathlib.Path:
    """ROOT/slides: the study's synthetic slides (once); returns the manifest.

    A second process of the study waits for the first one's slides (as for the tiling below)."""
    manifest = root / "slides" / "manifest.csv"
    with grid.claim(root / "slides", wait=True):
        if not manifest.is_file():
            writing.generate(root / "slides", data.slides, data.size, seed=data.seed, layout=LAYOUT)
    return manifest


def tile(manifest: pathlib.Path, data_dir: pathlib.Path, patch_size: int) -> pathlib.Path:
    """The slides tiled at `patch_size` (stride = patch size) into `data_dir`, through the tiler (once)."""
    with grid.claim(data_dir, wait=True):
        if not (data_dir / "metadata.json").is_file():
            tile_manifest.tile_manifest(manifest, data_dir,
                                        TilingConfig(patch_size=patch_size, stride=patch_size), workers=2)
    return data_dir


def shortcut_strength(table: Mapping[str, np.ndarray], tau: float, split: str = "train") -> dict[str, Any]:
    """The shortcut on one split of a patch table: minority shares per class and the tissue-ratio gap."""
    counts = stats.split_group_counts(table, tau).get(split)
    if counts is None or np.any(counts.sum(axis=1) == 0):
        raise InputError(f"the {split} split needs patches of both classes to measure the shortcut")
    chosen = table["split"] == split
    ratio = {y: table["tissue_ratio"][chosen & (table["label"] == y)] for y in (NON_TUMOUR, TUMOUR)}
    return {
        f"{split} patches": int(counts.sum()),
        f"tumour share r < {tau:g}": float(counts[TUMOUR, 0] / counts[TUMOUR].sum()),
        f"non-tumour share r >= {tau:g}": float(counts[NON_TUMOUR, 1] / counts[NON_TUMOUR].sum()),
        "mean ratio gap": float(ratio[TUMOUR].mean() - ratio[NON_TUMOUR].mean()),
        "median ratio gap": float(np.median(ratio[TUMOUR]) - np.median(ratio[NON_TUMOUR])),
        "empty groups": ", ".join(f"({dataset.CLASS_NAMES[y]}, a={a})" for y, a in zip(*np.nonzero(counts == 0)))
                        or "none",
    }


def method_figures(summary: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """ERM's and GERNE's test figures (checkpoint chosen on validation WGA), ERM's gap and GERNE's gain."""
    by_family = {entry["family"]: entry for entry in summary if entry["checkpoint"] == "best_wga"}
    row = {}
    for family in ("erm", "gerne"):
        for metric in ("WGA", "BCA"):
            for stat in ("mean", "std"):
                row[f"{family} test {metric} {stat}"] = by_family[family][f"test {metric} {stat}"]
    erm, gerne = by_family["erm"], by_family["gerne"]
    row["erm BCA - WGA"] = erm["test BCA mean"] - erm["test WGA mean"]
    row["gerne WGA gain"] = gerne["test WGA mean"] - erm["test WGA mean"]
    return row


def readable_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A results row for the Markdown table: test figures as `mean ± std`, differences in points."""
    out = {key: value for key, value in row.items() if " test " not in key and not key.endswith(("- WGA", "gain"))}
    for family, difference in (("erm", "erm BCA - WGA"), ("gerne", "gerne WGA gain")):
        for metric in ("WGA", "BCA"):
            out[f"{family} test {metric}"] = (f"{row[f'{family} test {metric} mean']:.3f} ± "
                                              f"{row[f'{family} test {metric} std']:.3f}")
        out[f"{difference} (points)"] = f"{100 * row[difference]:+.1f}"
    return out


def plot(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    """ERM's gap and GERNE's gain (left) and the minority shares (right) against the patch size."""
    sizes = [row["patch size"] for row in rows]
    fig, (left, right) = files.new_figure(1, 2, figsize=(10, 3.8))
    left.plot(sizes, [row["erm BCA - WGA"] for row in rows], marker="o", label="ERM test BCA - WGA")
    left.plot(sizes, [row["gerne WGA gain"] for row in rows], marker="s", label="GERNE test WGA - ERM test WGA")
    left.axhline(0.0, color="0.5", linewidth=0.8)
    left.set_ylabel("accuracy difference")
    shares = [key for key in rows[0] if "share" in key]
    for key in shares:
        right.plot(sizes, [row[key] for row in rows], marker="o", label=key)
    right.set_ylabel("share of the class (training split)")
    right.set_ylim(0, max(0.05, *(row[key] for row in rows for key in shares)) * 1.15)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("patch size P (pixels)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
    with files.atomic_write(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def patch_size_study(root: str | pathlib.Path, *, patch_sizes: Sequence[int] = PATCH_SIZES,
                     seeds: Sequence[int] = (0, 1, 2), data: DataSize = DEFAULT, tau: float = TAU,
                     overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Tiles, trains and evaluates every patch size; writes the table and the plot; returns the rows."""
    root = pathlib.Path(root)
    if not patch_sizes or any(p < 8 for p in patch_sizes):
        raise InputError(f"--patch-sizes must be >= 8 pixels each, got {list(patch_sizes)}")
    manifest = make_slides(root, data)
    rows = []
    for i, patch_size in enumerate(sorted(patch_sizes)):
        print(f"\n=== patch size {patch_size} ({i + 1}/{len(patch_sizes)}) ===", flush=True)
        data_dir = tile(manifest, root / f"data_p{patch_size}", patch_size)
        strength = shortcut_strength(dataset.read_patch_table(data_dir), tau)
        common = {"data.dir": str(data_dir), "data.taus": (tau,), "training.steps": data.steps,
                  "method.empty_group": "drop", **(overrides or {})}
        summary = grid.run_grid(SETTINGS, seeds, root / "runs" / f"p{patch_size}", common=common,
                                out=root / f"p{patch_size}")
        rows.append({"patch size": patch_size, **strength, **method_figures(summary)})
    write_csv(rows, root / "results.csv")
    plot(rows, root / "patch_size.png")
    table = markdown_table([readable_row(row) for row in rows])
    files.write_text_atomic(root / "results.md", "\n".join([
        "# Patch size: the shortcut's strength, ERM's gap and GERNE's gain (synthetic `sections` slides)", "",
        f"{data.slides} slides of {data.size} pixels (data seed {data.seed}), tiled at P = "
        f"{', '.join(map(str, sorted(patch_sizes)))} (stride P); tau = {tau:g}; shares and ratio gaps on the "
        f"training split; test figures with the checkpoint chosen on validation WGA, mean (± std) over seeds "
        f"{', '.join(map(str, seeds))}. {grid.describe(SETTINGS, seeds, common | {'data.dir': 'ROOT/data_p<P>'})}",
        "", table, "", "![gap and gain against patch size](patch_size.png)", "",
        "Every run: `p<P>/results.md`.", ""]))
    print(f"\n{table}\n\nwrote {root / 'results.md'}, results.csv, patch_size.png")
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=list(PATCH_SIZES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slides", type=int, default=DataSize.slides)
    parser.add_argument("--size", type=int, default=DataSize.size, help="nominal slide side in pixels")
    parser.add_argument("--data-seed", type=int, default=DataSize.seed)
    parser.add_argument("--steps", type=int, default=DataSize.steps, help="training steps of every run")
    parser.add_argument("--tau", type=float, default=TAU)
    parser.add_argument("--set", default="", help="overrides of every run (as in grid.py), e.g. batch=8")
    parser.add_argument("--smoke", action="store_true", help=f"a minutes-long check: {SMOKE}, one seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = SMOKE if args.smoke else DataSize(args.slides, args.size, args.data_seed, args.steps)
    patch_size_study(args.root, patch_sizes=args.patch_sizes, seeds=args.seeds[:1] if args.smoke else args.seeds,
                     data=data, tau=args.tau, overrides=grid.parse_overrides(args.set))
    return 0


if __name__ == "__main__":
    grid.run_script(main)
