"""Trains a grid of runs over seeds, evaluates them, and tunes each method on the validation split.

    from experiments.grid import Setting, run_grid
    lr = "optimizer.learning_rate"
    settings = [Setting("erm", {lr: 0.1}), Setting("gerne", {"method.c": 0.5, "method.beta": 1.0, lr: 0.03})]
    summary = run_grid(settings, seeds=[0, 1, 2], root="runs/grid", common={"training.steps": 1500})

or, from the shell, with the short keys of `ALIASES` (any dotted config key works too):

    python -m experiments.grid --root runs/grid --seeds 0 1 2 --set steps=1500 \
        --runs erm,lr=0.1 gerne,c=0.5,beta=1,lr=0.03

A `Setting` is a method of `configs/demo.py` (erm, gerne, resample) and dotted config overrides.
Each run's config is that method's config with a constant learning rate (`TUNED_SCHEDULE`), then the
`common` overrides, then the setting's own (which win where both set a key), then `training.seed`
from the seed. Every run trains in-process in `ROOT/<setting name>_seed<S>` (finished runs are skipped,
interrupted ones resume: the trainer resumes a workdir); then each run's `best_wga` and `best_bca`
checkpoints (both chosen on the validation split, docs/design.md §5) are evaluated on the test split.

Several processes given the same ROOT share the work: a run being trained holds a lock on its folder
(released by the OS if the process dies), the others skip it and, before evaluating, wait for it to
finish (and resume it themselves if its process died); one of them evaluates, the others reuse its
results (`OUT/evaluated.json` records the run states they come from, so a finished grid is not
evaluated again). Start one process per device or, on CPU, two to overlap start-up and evaluate.

Tuning never looks at the test split: within each method family the setting with the highest mean
validation worst-group accuracy over the seeds is chosen (for the `best_bca` checkpoints: the highest
validation balanced class accuracy), and its test figures are reported as mean and standard deviation.

Writes `ROOT/results.md` (the tuned summary, then every run), `ROOT/results.csv`, `ROOT/summary.json`
and `ROOT/summary.png`; the evaluation JSONs and PNGs go to `ROOT/eval/` (`out=DIR` writes these to
DIR instead, so several summaries can share one ROOT of runs).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from configs import demo
from experiments.tables import markdown_table, over_seeds
from gerne_jax.core import cli, config_utils, files
from gerne_jax.evaluation import evaluate
from gerne_jax.methods import registry
from gerne_jax.runs import run_log
from gerne_jax.train import trainer

# Short names of the config keys a grid varies, for run folder names and the command line. Their order
# is the order of a name's parts: every run folder `make experiments` has written keeps its name.
ALIASES = {"c": "method.c", "beta": "method.beta", "lr": "optimizer.learning_rate", "norm": "model.norm",
           "tau": "data.taus", "steps": "training.steps", "batch": "training.batch_per_group",
           "data_dir": "data.dir", "eta": "method.group_dro.eta", "id": "method.jtt.identification_workdir",
           "lambda": "method.jtt.upweight", "base": "method.dfr.base_workdir",
           "base_checkpoint": "method.dfr.base_checkpoint", "scoring": "method.pseudo_groups.scoring_workdir",
           "t": "method.pseudo_groups.fraction", "sampling": "method.erm.sampling"}
_ALIAS_OF = {key: alias for alias, key in ALIASES.items()}
SEED_KEY = "training.seed"  # set per run from the seeds, never by a setting
# In a string override, replaced by the run's seed: a run that builds on another run of its own seed
# (JTT's identification run, DFR's base run) names it as `ROOT/erm_lr0.1_seed{seed}`.
SEED_PLACEHOLDER = "{seed}"
# Each checkpoint rule and the validation metric that also picks the hyperparameters under it.
CHECKPOINTS = {"best_wga": "val WGA", "best_bca": "val BCA"}
STAMP_FILE = "evaluated.json"  # in the results folder: the run states its results were computed from
# In a run folder: its loss turned non-finite (the error message). The run counts as done and failed: it is
# neither trained again nor evaluated, so a learning rate that diverges drops out of tuning.
DIVERGED_FILE = "diverged.txt"
METRICS = (("WGA", "worst_group_accuracy"), ("BCA", "balanced_class_accuracy"))


def _name_rank(key: str) -> tuple[int, str]:
    """Aliased keys in the order of ALIASES, then any other key alphabetically."""
    return (list(ALIASES.values()).index(key), "") if key in _ALIAS_OF else (len(ALIASES), key)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(map(_format_value, value))
    if isinstance(value, str) and "/" in value:  # another run's folder: its name, without its seed
        return pathlib.PurePath(value).name.replace(f"_seed{SEED_PLACEHOLDER}", "")
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of a grid: a method of `configs/demo.py` and dotted config overrides.

    `row` names the family tuning chooses within when one method makes several rows (the arms of
    GERNE, ERM's samplings); by default the family is the method. It is not part of the run's name.
    The overrides are stored in a fixed order (`_name_rank`), whatever order they were given in, so
    that equal settings have one name and therefore one run folder; lists become tuples so that a
    setting can be a dict key.
    """

    method: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    row: str = ""

    def __post_init__(self) -> None:
        ordered = sorted(self.overrides.items(), key=lambda item: _name_rank(item[0]))
        object.__setattr__(self, "overrides", types.MappingProxyType({k: _frozen(v) for k, v in ordered}))

    def __hash__(self) -> int:
        return hash((self.method, tuple(self.overrides.items()), self.row))

    @property
    def family(self) -> str:
        """What tuning chooses among: settings of one family (the row, else the method) compete, families do not."""
        return self.row or self.method

    @property
    def name(self) -> str:
        """A folder-safe name: `gerne`, {c: 0.5, beta: 1, lr: 0.003} -> `gerne_c0.5_beta1_lr0.003`."""
        parts = [self.method, *(f"{_ALIAS_OF.get(key, key)}{_format_value(value)}"
                                for key, value in self.overrides.items())]
        return re.sub(r"[^A-Za-z0-9.+_-]", "", "_".join(parts))

    def updated(self, overrides: Mapping[str, Any]) -> Setting:
        """The same method and row with some overrides replaced or added."""
        return Setting(self.method, {**self.overrides, **overrides}, self.row)


def run_name(setting: Setting, seed: int) -> str:
    """The run folder of one setting and seed: `gerne_beta1_lr0.003_seed0`."""
    return f"{setting.name}_seed{seed}"


# The experiments' learning rate schedule: constant, as the settings of the recorded results (docs/results.md)
# were tuned; configs/demo.py itself warms up and decays. `common` or a setting may change it.
TUNED_SCHEDULE = {"optimizer.schedule": "constant", "optimizer.warmup_steps": 0}


def run_config(setting: Setting, seed: int,
               common: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The method's `configs/demo.py` config with `TUNED_SCHEDULE`, then `common`, then the setting's
    overrides, then the seed (also put in place of `{seed}` in string overrides)."""
    overrides = {key: value.replace(SEED_PLACEHOLDER, str(seed)) if isinstance(value, str) else value
                 for key, value in {**TUNED_SCHEDULE, **(common or {}), **setting.overrides}.items()}
    if SEED_KEY in overrides:
        raise ValueError(f"{SEED_KEY} is set per run from the seeds; give it as a seed, not as an override")
    return config_utils.with_overrides(demo.get_config(setting.method), {**overrides, SEED_KEY: seed})


def parse_overrides(text: str, method: str = "gerne") -> dict[str, Any]:
    """`lr=0.1,tau=0.03+0.2` (aliases or dotted keys) -> dotted overrides typed like the method's config."""
    current = config_utils.flatten(demo.get_config(method))
    overrides = {}
    for item in filter(None, text.split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        key = ALIASES.get(key, key)
        if not sep or key not in current:
            raise ValueError(f"{item!r} is not KEY=VALUE with a config key or one of {list(ALIASES)}"
                             + config_utils.did_you_mean(key, [*ALIASES, *current]))
        overrides[key] = _parse_like(value, current[key])
    return overrides


def parse_setting(text: str) -> Setting:
    """The command line's form of a setting, `METHOD[,KEY=VALUE...]`: `gerne,c=0.5,lr=0.1` -> a Setting."""
    method, _, rest = text.partition(",")
    return Setting(method, parse_overrides(rest, method))


def _parse_like(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if isinstance(current, tuple):  # thresholds: 0.03+0.2
        return tuple(float(part) for part in text.split("+"))
    return type(current)(text)


@contextlib.contextmanager
def claim(workdir: pathlib.Path, wait: bool = False) -> Iterator[bool]:
    """Holds an exclusive lock on `workdir` while it trains; yields False if another process holds it.

    The lock goes with the file's closing, and `flock` locks die with their process, so a killed
    process never leaves a run claimed. With `wait`, blocks until the other process is done and then
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


def diverged(workdir: pathlib.Path) -> bool:
    return (workdir / DIVERGED_FILE).is_file()


def is_done(workdir: pathlib.Path) -> bool:
    """Finished, or stopped for good by a non-finite loss."""
    return run_log.is_finished(workdir) or diverged(workdir)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    try:
        registry.train(config, workdir)
    except trainer.NonFiniteLossError as error:
        files.write_text_atomic(workdir / DIVERGED_FILE, f"{error}\n")
        print(f">>> {workdir.name}: diverged ({error}); left out of tuning and evaluation", flush=True)


def train_all(configs: Mapping[pathlib.Path, ml_collections.ConfigDict]) -> None:
    """Trains every unfinished run, skipping those another process is training, then waits for those."""
    pending = []
    for workdir, config in configs.items():
        if is_done(workdir):
            print(f">>> {workdir.name}: {'diverged' if diverged(workdir) else 'finished'}, skipped", flush=True)
            continue
        with claim(workdir) as mine:
            if mine and not is_done(workdir):  # another process may have finished it meanwhile
                print(f"\n>>> {workdir.name}: training", flush=True)
                _train(config, workdir)
            elif not mine:
                print(f">>> {workdir.name}: being trained by another process", flush=True)
                pending.append(workdir)
    for workdir in pending:
        with claim(workdir, wait=True):
            if not is_done(workdir):  # the process training it stopped: resume it here
                print(f"\n>>> {workdir.name}: left unfinished by another process; resuming", flush=True)
                _train(configs[workdir], workdir)


def evaluate_all(workdirs: Sequence[pathlib.Path], checkpoint: str, split: str, out: pathlib.Path,
                 split_cache: dict[str, Any]) -> dict[str, evaluate.RunEvaluation]:
    """Every run's `checkpoint` on the split, keyed by run folder name; JSON and PNGs written to `out`."""
    evaluations = {workdir.name: evaluate.evaluate_run(workdir, checkpoint, split, split_cache=split_cache)
                   for workdir in workdirs}
    evaluate.write_results(evaluations, out)
    return evaluations


def collect_rows(settings: Sequence[Setting], seeds: Sequence[int],
                 evaluations: Mapping[str, Mapping[str, evaluate.RunEvaluation]]) -> list[dict[str, Any]]:
    """One row per (setting, seed, checkpoint): validation figures it was chosen on, and test figures."""
    rows = []
    for checkpoint, by_run in evaluations.items():
        for setting in settings:
            for seed in seeds:
                if run_name(setting, seed) not in by_run:  # diverged
                    continue
                entry = by_run[run_name(setting, seed)]
                (tau, result), = entry.reports.items()
                row = {"family": setting.family, "setting": setting.name, "seed": seed,
                       "checkpoint": checkpoint, "step": int(entry.checkpoint_meta["step"]), "tau": tau}
                for short, key in METRICS:
                    row[f"val {short}"] = float(entry.checkpoint_meta["metrics"][key])
                    row[f"{entry.split_name} {short}"] = float(result[key])
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
            by_setting = {s: [row for row in mine if row["setting"] == s]
                          for s in dict.fromkeys(r["setting"] for r in mine)}
            best = max(by_setting, key=lambda s: np.mean([row[metric] for row in by_setting[s]]))
            chosen = by_setting[best]
            entry = {"family": name, "checkpoint": checkpoint, "tuned on": metric, "chosen setting": best,
                     "seeds": len(chosen)}
            for short, _ in METRICS:
                for prefix in ("val", split):
                    entry[f"{prefix} {short} mean"], entry[f"{prefix} {short} std"] = over_seeds(
                        [row[f"{prefix} {short}"] for row in chosen])
            summary.append(entry)
    return summary


def chosen_settings(summary: Sequence[Mapping[str, Any]],
                    settings: Sequence[Setting]) -> dict[str, list[Setting]]:
    """Per checkpoint rule, the settings the tuned `summary` chose (one per family), as Setting values."""
    by_name = {setting.name: setting for setting in settings}
    chosen: dict[str, list[Setting]] = {}
    for entry in summary:
        chosen.setdefault(entry["checkpoint"], []).append(by_name[entry["chosen setting"]])
    return chosen


def plot_summary(summary: Sequence[Mapping[str, Any]], split: str, path: pathlib.Path) -> None:
    """Test WGA and BCA (mean, std over seeds) of each tuned family, per checkpoint rule."""
    fig, axes = files.new_figure(1, len(METRICS), figsize=(5.5 * len(METRICS), 3.8), sharey=True)
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
    files.save_figure(fig, path)


def evaluation_stamp(workdirs: Sequence[pathlib.Path], split: str) -> dict[str, Any]:
    """What the results depend on: the split and each run's state (its metrics.jsonl changes whenever
    a checkpoint does)."""
    return {"split": split, "runs": {str(w): (w / run_log.METRICS_FILE).stat().st_mtime_ns for w in workdirs}}


def describe(settings: Sequence[Setting], seeds: Sequence[int], common: Mapping[str, Any]) -> str:
    """What a grid ran, for its reports: its settings, seeds and common overrides in one sentence."""
    overrides = ", ".join(f"`{key}={_format_value(_frozen(value))}`" for key, value in common.items())
    return (f"Settings (`configs/demo.py` method and overrides): {', '.join(f'`{s.name}`' for s in settings)}"
            f"; seeds {', '.join(map(str, seeds))}; overrides of every run: {overrides or 'none'}.")


def run_grid(settings: Sequence[Setting], seeds: Sequence[int], root: str | os.PathLike, *,
             common: Mapping[str, Any] | None = None, split: str = "test",
             out: str | os.PathLike | None = None, skip_training: bool = False) -> list[dict[str, Any]]:
    """Trains (unless `skip_training`), evaluates and tunes the grid; returns the tuned summary.

    Every run's config is built before any training starts, so a bad override fails at once rather
    than hours in. The summary has one entry per family and checkpoint rule (`tuned_summary`);
    `chosen_settings` turns it back into Settings.
    """
    root = pathlib.Path(root)
    configs = {root / run_name(s, seed): run_config(s, seed, common) for s in settings for seed in seeds}
    if len(configs) != len(settings) * len(seeds):
        names = [run_name(s, seed) for s in settings for seed in seeds]
        raise ValueError(f"settings and seeds give the same run folder twice: "
                         f"{sorted({n for n in names if names.count(n) > 1})}")
    root.mkdir(parents=True, exist_ok=True)
    if not skip_training:
        train_all(configs)

    out = pathlib.Path(out) if out else root
    workdirs = [workdir for workdir in configs if not diverged(workdir)]
    with claim(out, wait=True):  # one process evaluates; others sharing `out` wait, then reuse its results
        stamp = evaluation_stamp(workdirs, split)
        if (out / STAMP_FILE).is_file() and json.loads((out / STAMP_FILE).read_text()) == stamp:
            print(f"\n{(out / 'results.md').read_text()}\n{out}: up to date with the runs; reused")
            return json.loads((out / "summary.json").read_text())
        summary = summarise(settings, seeds, common or {}, split, workdirs, out)
        files.write_text_atomic(out / STAMP_FILE, json.dumps(stamp))
    return summary


def summarise(settings: Sequence[Setting], seeds: Sequence[int], common: Mapping[str, Any], split: str,
              workdirs: Sequence[pathlib.Path], out: pathlib.Path) -> list[dict[str, Any]]:
    """Evaluates every run's checkpoints on the split, tunes per family and writes the results to `out`."""
    split_cache: dict[str, Any] = {}  # the split is loaded once for every run and checkpoint
    evaluations = {checkpoint: evaluate_all(workdirs, checkpoint, split, out / "eval", split_cache)
                   for checkpoint in CHECKPOINTS}
    rows = collect_rows(settings, seeds, evaluations)
    summary = tuned_summary(rows, split)
    plot_summary(summary, split, out / "summary.png")
    with files.atomic_write(out / "results.csv") as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True))
    files.write_text_atomic(out / "results.md", "\n".join([
        f"# Grid results (synthetic data), {split} split", "", describe(settings, seeds, common), "",
        "## Tuned on the validation split per method family (mean, std over seeds)", "",
        markdown_table(summary), "", "![summary](summary.png)", "",
        "## Every run", "", markdown_table(rows), ""]))
    print(f"\n{markdown_table(summary)}\n\nwrote {out / 'results.md'}, results.csv, summary.png")
    return summary


def run_script(main: Callable[[], int]) -> None:
    """Runs an experiment's command line like train.py: its logging, one line for bad input, and on
    SIGTERM (the trainer saved the run) exit status 143; running the same command again resumes."""
    cli.setup_logging()
    cli.run_command(main)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder for the runs and the results")
    parser.add_argument("--out", default=None, help="folder for the results and evaluations (default: ROOT)")
    parser.add_argument("--runs", nargs="+", required=True, help="settings, METHOD[,KEY=VALUE...] each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", default="", help="overrides of every run, e.g. steps=1500,tau=0.2 "
                        "(a setting's own win)")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--skip-training", action="store_true", help="only evaluate and summarise")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_grid([parse_setting(text) for text in args.runs], args.seeds, args.root,
             common=parse_overrides(args.set), split=args.split, out=args.out,
             skip_training=args.skip_training)
    return 0


if __name__ == "__main__":
    run_script(main)
