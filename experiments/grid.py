"""Trains a grid of runs over seeds, evaluates them, and tunes each method on the validation split.

  python experiments/grid.py --root runs/grid --seeds 0 1 2 --set steps=1500 \
      --runs erm,lr=0.01 erm,lr=0.03 resample,lr=0.01 gerne,beta=1,lr=0.003 gerne,beta=0.5,lr=0.01

Each `--runs` item is a `configs/demo.py` argument (method, then presets); `--set` presets apply
to every run (a run's own presets win where both set a key), `seed=S` to each seed's copy. Every
run trains in `ROOT/<run>_seed<S>` (finished runs are skipped, interrupted ones resume: train.py
resumes a workdir), then `evaluate.py --compare` evaluates all of them on the test split with their
`best_wga` and their `best_bca` checkpoints (both chosen on the validation split).

Several grid.py processes given the same ROOT share the work: a run being trained holds a lock on
its folder (released by the OS if the process dies), the others skip it and, before evaluating,
wait for it to finish; one of them evaluates, the others reuse its results (`OUT/evaluated.json`
records the run states they come from, so a finished grid is not evaluated again). Start one
process per device or, on CPU, two to overlap start-up and evaluation.

Tuning never looks at the test split: within each method family (the first word of the run:
`erm`, `resample`, `gerne`) the run settings with the highest mean validation worst-group accuracy
over the seeds are chosen (for the `best_bca` checkpoints: the highest validation balanced class
accuracy), and their test figures are reported as mean and standard deviation.

Writes `ROOT/results.md` (the tuned summary, then every run), `ROOT/results.csv`,
`ROOT/summary.json` and `ROOT/summary.png`; the evaluation JSONs and PNGs go to `ROOT/eval/`
(`--out DIR` writes these to DIR instead, so several summaries can share one ROOT of runs).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gerne_jax import experiment, files, reports  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Each checkpoint rule and the validation metric that also picks the hyperparameters under it.
CHECKPOINTS = {"best_wga": "val WGA", "best_bca": "val BCA"}
STAMP_FILE = "evaluated.json"  # in the results folder: the run states its results were computed from
METRICS = (("WGA", "worst_group_accuracy"), ("BCA", "balanced_class_accuracy"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder for the runs and the results")
    parser.add_argument("--out", default=None, help="folder for the results and evaluations (default: ROOT)")
    parser.add_argument("--runs", nargs="+", required=True, help="configs/demo.py arguments, one per setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", default="", help="presets for every run, e.g. steps=1500,tau=0.2 (a run's own presets win)")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.py"))
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--skip-training", action="store_true", help="only evaluate and summarise")
    return parser.parse_args(argv)


def run_name(setting: str, seed: int) -> str:
    """A folder name for one setting and seed: `gerne,beta=1,lr=0.003` -> `gerne_beta1_lr0.003_seed0`."""
    name = re.sub(r"[^A-Za-z0-9.+_-]", "", setting.replace(",", "_").replace("=", ""))
    return f"{name}_seed{seed}"


def family(setting: str) -> str:
    return setting.partition(",")[0]


def is_finished(workdir: pathlib.Path) -> bool:
    """True when the run's metrics.jsonl holds the validation figures of its last step."""
    metrics = workdir / "metrics.jsonl"
    if not (workdir / "config.json").is_file() or not metrics.is_file():
        return False
    steps = experiment.load_config(workdir).training.steps
    return any(row["split"] == "validation" and row["step"] == steps
               for row in map(json.loads, filter(str.strip, metrics.read_text().splitlines())))


@contextlib.contextmanager
def claim(workdir: pathlib.Path, wait: bool = False) -> Iterator[bool]:
    """Holds an exclusive lock on `workdir` while it trains; yields False if another process holds it.

    The lock goes with the file's closing, and `flock` locks die with their process, so a killed
    grid.py never leaves a run claimed. With `wait`, blocks until the other process is done and then
    yields True.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".grid.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def train_all(config: str, settings: Sequence[str], extra: str, seeds: Sequence[int], root: pathlib.Path) -> None:
    """Trains every unfinished run, skipping those another grid.py is training, then waits for those."""
    pending = []
    for setting in settings:
        for seed in seeds:
            workdir = root / run_name(setting, seed)
            if is_finished(workdir):
                print(f">>> {workdir.name}: finished, skipped", flush=True)
                continue
            with claim(workdir) as mine:
                if mine and not is_finished(workdir):  # another process may have finished it meanwhile
                    train(config, setting, extra, seed, workdir)
                elif not mine:
                    print(f">>> {workdir.name}: being trained by another process", flush=True)
                    pending.append(workdir)
    for workdir in pending:
        with claim(workdir, wait=True):
            if not is_finished(workdir):
                raise SystemExit(f"error: {workdir} was not finished by the process that trained it; "
                                 "run grid.py again to resume it")


def run_presets(setting: str, extra: str, seed: int) -> str:
    """The config argument of one run: the method, the `--set` presets, the setting's own (which win
    over `--set` for a key both give: later presets override earlier ones), then the seed."""
    method, _, own = setting.partition(",")
    return ",".join(filter(None, [method, extra, own, f"seed={seed}"]))


def train(config: str, setting: str, extra: str, seed: int, workdir: pathlib.Path) -> None:
    presets = run_presets(setting, extra, seed)
    command = [sys.executable, str(REPO / "train.py"), "--config", f"{config}:{presets}",
               "--workdir", str(workdir)]
    print(f"\n>>> {workdir.name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def evaluate(workdirs: Sequence[pathlib.Path], checkpoint: str, split: str, out: pathlib.Path) -> dict[str, Any]:
    """`evaluate.py --compare` on all runs; returns its JSON (run name -> results)."""
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--compare", *map(str, workdirs),
                    "--checkpoint", checkpoint, "--split", split, "--out", str(out)], check=True, cwd=REPO)
    return json.loads((out / f"{checkpoint}_{split}.json").read_text())


def collect_rows(settings: Sequence[str], seeds: Sequence[int],
                 documents: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, seed, checkpoint): validation figures it was chosen on, and test figures."""
    rows = []
    for checkpoint, document in documents.items():
        for setting in settings:
            for seed in seeds:
                entry = document[run_name(setting, seed)]
                (tau_key, result), = entry["results"].items()
                row = {"family": family(setting), "setting": setting, "seed": seed, "checkpoint": checkpoint,
                       "step": entry["checkpoint_step"], "tau": tau_key}
                for short, key in METRICS:
                    row[f"val {short}"] = entry["selected_on_validation"][key]
                    row[f"{entry['split']} {short}"] = result[key]
                rows.append(row)
    return rows


def tuned_summary(rows: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """Per family and checkpoint rule: the setting with the best mean validation figure, test mean and std.

    Under `best_wga` the settings are compared by validation WGA, under `best_bca` by validation BCA
    (the same metric that chose the checkpoint), so each rule is a complete selection procedure.
    """
    summary = []
    for checkpoint in dict.fromkeys(row["checkpoint"] for row in rows):
        metric = CHECKPOINTS[checkpoint]
        for name in dict.fromkeys(row["family"] for row in rows):
            mine = [row for row in rows if row["family"] == name and row["checkpoint"] == checkpoint]
            by_setting = {s: [row for row in mine if row["setting"] == s] for s in dict.fromkeys(r["setting"] for r in mine)}
            best = max(by_setting, key=lambda s: np.mean([row[metric] for row in by_setting[s]]))
            chosen = by_setting[best]
            entry = {"family": name, "checkpoint": checkpoint, "tuned on": metric, "chosen setting": best,
                     "seeds": len(chosen)}
            for short, _ in METRICS:
                for prefix in ("val", split):
                    values = np.array([row[f"{prefix} {short}"] for row in chosen])
                    entry[f"{prefix} {short} mean"] = float(values.mean())
                    entry[f"{prefix} {short} std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            summary.append(entry)
    return summary


def plot_summary(summary: Sequence[Mapping[str, Any]], split: str, path: pathlib.Path) -> None:
    """Test WGA and BCA (mean, std over seeds) of each tuned family, per checkpoint rule."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 3.8), sharey=True)
    checkpoints = list(dict.fromkeys(entry["checkpoint"] for entry in summary))
    families = list(dict.fromkeys(entry["family"] for entry in summary))
    width = 0.8 / len(checkpoints)
    for axis, (short, _) in zip(axes, METRICS):
        for i, checkpoint in enumerate(checkpoints):
            entries = {e["family"]: e for e in summary if e["checkpoint"] == checkpoint}
            axis.bar(np.arange(len(families)) + (i - (len(checkpoints) - 1) / 2) * width,
                     [entries[f][f"{split} {short} mean"] for f in families], width,
                     yerr=[np.nan_to_num(entries[f][f"{split} {short} std"]) for f in families],
                     capsize=3, label=f"selected by {checkpoint}")
        axis.set_xticks(np.arange(len(families)), families)
        axis.set_title(f"{split} {short} (mean, std over seeds)")
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    reports.save_figure(fig, path)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    workdirs = [root / run_name(s, seed) for s in args.runs for seed in args.seeds]
    if len(set(workdirs)) != len(workdirs):
        raise SystemExit(f"error: --runs {args.runs} give duplicate run folders")
    if not args.skip_training:
        train_all(args.config, args.runs, args.set, args.seeds, root)

    out = pathlib.Path(args.out) if args.out else root
    with claim(out, wait=True):  # one process evaluates; others sharing `out` wait, then reuse its results
        stamp = evaluation_stamp(workdirs, args.split)
        if (out / STAMP_FILE).is_file() and json.loads((out / STAMP_FILE).read_text()) == stamp:
            print(f"\n{(out / 'results.md').read_text()}\nthe results in {out} are up to date with the runs; reused")
            return 0
        summarise(args, argv, workdirs, out)
        files.write_text_atomic(out / STAMP_FILE, json.dumps(stamp))
    return 0


def evaluation_stamp(workdirs: Sequence[pathlib.Path], split: str) -> dict[str, Any]:
    """What the results depend on: the split and each run's state (its metrics.jsonl changes whenever
    a checkpoint does)."""
    return {"split": split, "runs": {str(w): (w / "metrics.jsonl").stat().st_mtime_ns for w in workdirs}}


def summarise(args: argparse.Namespace, argv: Sequence[str] | None, workdirs: Sequence[pathlib.Path],
              out: pathlib.Path) -> None:
    """Evaluates every run's checkpoints on the split, tunes per family and writes the results to `out`."""
    documents = {checkpoint: evaluate(workdirs, checkpoint, args.split, out / "eval") for checkpoint in CHECKPOINTS}
    rows = collect_rows(args.runs, args.seeds, documents)
    summary = tuned_summary(rows, args.split)
    plot_summary(summary, args.split, out / "summary.png")
    with files.atomic_write(out / "results.csv") as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True))
    command = " ".join(["python experiments/grid.py", *(sys.argv[1:] if argv is None else argv)])
    files.write_text_atomic(out / "results.md", "\n".join([
        f"# Grid results (synthetic data), {args.split} split", "", f"Reproduce: `{command}`", "",
        "## Tuned on the validation split per method family (mean, std over seeds)", "",
        markdown_table(summary), "", "![summary](summary.png)", "",
        "## Every run", "", markdown_table(rows), ""]))
    print(f"\n{markdown_table(summary)}\n\nwrote {out / 'results.md'}, results.csv, summary.png")


if __name__ == "__main__":
    sys.exit(main())
