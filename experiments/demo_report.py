"""Writes the `make demo` report: Markdown with the side-by-side table and the PNGs beside it.

  python -m experiments.demo_report --eval-dir runs/demo/eval --runs runs/demo/erm runs/demo/gerne \
      --data-dir runs/demo/data --out runs/demo/report.md

Reads what `evaluate.py --compare ... --out EVAL_DIR` wrote (`<checkpoint>_<split>.json` and its
PNGs), each run's config and validation metrics (`gerne_jax.runs.run_log`; the curves are plotted here) and
the data's `patches.csv` (group counts per split). With `--predictions` (one `predict.py --out` folder
per run, in the order of `--runs`) it adds the whole-slide section: the runs' overlays of one slide side
by side and their per-slide summaries. Computes nothing about the models itself: every figure in the
report is one that evaluate.py, predict.py or train.py measured.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.image
import ml_collections
import numpy as np

from data_pipeline import stats
from experiments.tables import markdown_table
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.evaluation import reports
from gerne_jax.runs import run_log

CURVE_METRICS = (("validation WGA", "worst_group_accuracy"), ("validation BCA", "balanced_class_accuracy"))
CONFIG_COLUMNS = (("method", "method.name"), ("c", "method.c"), ("beta", "method.beta"),
                  ("lr", "optimizer.learning_rate"), ("model", "model.name"), ("norm", "model.norm"),
                  ("steps", "training.steps"), ("B", "training.batch_per_group"), ("tau", "data.taus"),
                  ("seed", "training.seed"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, help="the --out folder of `evaluate.py --compare`")
    parser.add_argument("--runs", nargs="+", required=True, help="the run workdirs, as given to --compare")
    parser.add_argument("--data-dir", required=True, help="the DATA_DIR the runs trained on")
    parser.add_argument("--checkpoints", nargs="+", default=["best_wga", "best_bca"],
                        help="checkpoints evaluated (one <checkpoint>_<split>.json each; missing ones are "
                        "skipped)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tau", type=float, nargs="+", default=None,
                        help="thresholds of the group-count tables (default: the runs' training taus)")
    parser.add_argument("--predictions", nargs="+", default=None,
                        help="`predict.py --out` folders, one per run in the order of --runs")
    parser.add_argument("--out", required=True, help="the Markdown file to write")
    return parser.parse_args(argv)


def prediction_section(runs: Sequence[pathlib.Path], folders: Sequence[pathlib.Path], out: pathlib.Path) -> list[str]:
    """The runs' overlays of the first slide they all predicted, side by side in one PNG, and per run
    its slides.csv as a table with a link to its index.md."""
    if len(folders) != len(runs):
        raise ValueError(f"--predictions has {len(folders)} folder(s) for {len(runs)} run(s); give one per run")
    tables = {}
    for run, folder in zip(runs, folders):
        path = folder / "slides.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run `predict.py --out {folder}` first")
        with open(path, newline="") as handle:
            tables[run.name] = list(csv.DictReader(handle))
    common = [row["slide_id"] for row in next(iter(tables.values())) if all(
        any(other["slide_id"] == row["slide_id"] and other.get("patches") for other in rows)
        for rows in tables.values())]
    lines = ["## Whole-slide prediction", "",
             "`predict.py` runs each model over the test slides whole (the tiler's patch grid, scale and tissue "
             "detection, the training normalisation): per slide the probability map as a pyramidal OME-TIFF "
             "that overlays the slide in QuPath (`probability.ome.tif`), one QuPath detection per patch with "
             "its `tumour_probability` (`detections.geojson`), the tumour regions (`regions.geojson`) and the "
             "map drawn over a thumbnail (`overlay.png`, below).", ""]
    if common:
        slide_id = common[0]
        images = [matplotlib.image.imread(folder / "slides" / slide_id / "overlay.png") for folder in folders]
        height, width = images[0].shape[:2]
        figure, axes = files.new_figure(1, len(runs), figsize=(7 * len(runs), 7 * height / width + 0.4))
        for axis, run, image in zip(np.atleast_1d(axes), runs, images):
            axis.imshow(image)
            axis.set_title(run.name, fontsize=14)
            axis.set_axis_off()
        figure.tight_layout()
        side_by_side = out.parent / f"overlays_{slide_id}.png"
        files.save_figure(figure, side_by_side)
        lines += [f"Slide `{slide_id}`, " + " vs ".join(run.name for run in runs)
                  + " (heatmap: tumour probability; green: true tumour outline; white: tissue):", "",
                  f"![{slide_id} side by side]({os.path.relpath(side_by_side, out.parent)})", ""]
    columns = ("slide_id", "patches", "tumour_patch_share", "mean_probability", "max_probability",
               "tumour_regions")
    for run, folder in zip(runs, folders):
        rows = [{name: _number(row.get(name, "")) for name in columns if name in row} for row in tables[run.name]]
        lines += [f"**{run.name}** ([all overlays]({os.path.relpath(folder / 'index.md', out.parent)}))", "",
                  markdown_table(rows), ""]
    return lines


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def plot_validation_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: pathlib.Path) -> None:
    """Validation WGA and BCA against the training step, one line per run (`run_log.read_metrics` rows)."""
    fig, axes = files.new_figure(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 3.6), sharey=True)
    for name, lines in logs.items():
        rows = run_log.rows_of(lines, "validation")
        for axis, (_, key) in zip(axes, CURVE_METRICS):
            axis.plot([row["step"] for row in rows], [row[key] for row in rows], marker=".", label=name)
    for axis, (title, _) in zip(axes, CURVE_METRICS):
        axis.set_title(title)
        axis.set_xlabel("training step")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    files.save_figure(fig, path)


def _config_value(config: ml_collections.ConfigDict, dotted: str) -> str:
    if dotted == "method.c" and config.method.name == "erm":
        return "-"  # ERM trains on the biased batch alone; c shapes only the less-biased batch
    value: Any = config
    for part in dotted.split("."):
        value = value[part]
    return "+".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else (
        f"{value:g}" if isinstance(value, float) else str(value))


def results_section(document: Mapping[str, Any], checkpoint: str, relative_eval: str) -> list[str]:
    """Per tau: one row per run with the test metrics, the checkpoint step and what it was chosen on."""
    names = list(document)
    lines = []
    for tau_key in document[names[0]]["results"]:
        rows = []
        for name in names:
            entry = document[name]
            report = entry["results"][tau_key]
            chosen = entry["selected_on_validation"]
            gap = report["balanced_class_accuracy"] - report["worst_group_accuracy"]
            rows.append({"run": name, "step": entry["checkpoint_step"],
                         **{short: float(report[key]) for short, key in reports.SUMMARY_METRICS},
                         "BCA - WGA": f"{gap:+.4f}",
                         "val WGA": float(chosen.get("worst_group_accuracy", float("nan"))),
                         "val BCA": float(chosen.get("balanced_class_accuracy", float("nan")))})
        stem = f"{checkpoint}_{document[names[0]]['split']}"
        lines += [f"### {tau_key}, checkpoint `{checkpoint}`", "", markdown_table(rows), "",
                  f"![per-group accuracy, {tau_key}]({relative_eval}/{stem}_groups_{tau_key}.png)", ""]
    return lines


def _scale_line(metadata: Mapping[str, Any]) -> str:
    """The data's patch size and the physical scale it was tiled at."""
    size, mpp = metadata["patch_size"], metadata.get("mpp")
    if mpp is None:
        return f"Patches of {size} pixels (pixel size unknown)."
    tiled = "tiled at" if metadata.get("level_downsample") is None else "read at"
    return f"Patches of {size} pixels {tiled} {mpp:g} µm/pixel: {size * mpp:g} µm of tissue a side."


def write_report(args: argparse.Namespace) -> pathlib.Path:
    out = pathlib.Path(args.out)
    eval_dir = pathlib.Path(args.eval_dir)
    runs = [pathlib.Path(run) for run in args.runs]
    documents = {checkpoint: json.loads(path.read_text()) for checkpoint in args.checkpoints
                 if (path := eval_dir / f"{checkpoint}_{args.split}.json").is_file()}
    if not documents:
        raise FileNotFoundError(f"{eval_dir}: none of {[f'{c}_{args.split}.json' for c in args.checkpoints]} "
                                "found; run `evaluate.py --compare ... --out` first")
    relative_eval = os.path.relpath(eval_dir, out.parent)

    configs = {run.name: run_log.read_config(run) for run in runs}  # fails first on a folder with no run
    curves = out.parent / "validation_curves.png"
    plot_validation_curves({run.name: run_log.read_metrics(run) for run in runs}, curves)

    table = dataset.read_patch_table(args.data_dir)
    taus = args.tau or sorted({float(t) for config in configs.values() for t in config.data.taus})

    lines = ["# gerne-jax demo report (synthetic data)", "",
             "Built-in synthetic slides (`gerne-jax synthetic`), not real microscopy. "
             f"Every run is evaluated on the **{args.split}** split with checkpoints chosen on the "
             "validation split only (`best_wga`: best validation worst-group accuracy; `best_bca`: "
             "best validation balanced class accuracy).", "",
             "## Runs", "",
             markdown_table([{"run": name,
                              **{short: _config_value(config, key) for short, key in CONFIG_COLUMNS}}
                             for name, config in configs.items()]), "",
             f"![validation curves]({os.path.relpath(curves, out.parent)})", "",
             "## Data: patches per group", "", _scale_line(dataset.read_metadata(args.data_dir)), ""]
    for tau in taus:
        lines += ["```", stats.format_group_counts(stats.split_group_counts(table, tau), tau), "```", ""]
    tissue_plot = pathlib.Path(args.data_dir) / stats.PLOT_FILE
    if tissue_plot.is_file():
        lines += [f"![tissue ratio per class]({os.path.relpath(tissue_plot, out.parent)})", ""]
    lines += ["## Results", "",
              "WGA: worst-group accuracy; GBA: group-balanced accuracy; BCA: balanced class accuracy "
              "(docs/design.md §5). `step`: the checkpoint's training step; `val WGA`/`val BCA`: the "
              "validation figures it was selected on (at the runs' training tau).", ""]
    for checkpoint, document in documents.items():
        lines += results_section(document, checkpoint, relative_eval)
        stem = f"{checkpoint}_{args.split}"
        lines += [f"![error rate against tissue ratio, `{checkpoint}`]"
                  f"({relative_eval}/{stem}_error_vs_tissue_ratio.png)", ""]

    if args.predictions:
        lines += prediction_section(runs, [pathlib.Path(folder) for folder in args.predictions], out)

    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(out, "\n".join(lines))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = write_report(args)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
