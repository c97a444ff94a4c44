"""`gerne-jax evaluate`: trained runs on a split, per group and per tau (docs/design.md §5).

  gerne-jax evaluate --workdir runs/gerne [--checkpoint best_wga|best_bca|latest|STEP]
                     [--split test] [--tau 0.03 0.1 0.2] [--compare runs/erm runs/gerne ...]

Prints the per-group table and WGA, GBA, BCA, average accuracy, worst-class accuracy and AUROC for
each tau, and writes to `WORKDIR/eval/` (or `--out`): `<checkpoint>_<split>.json` and PNGs of the
error rate against tissue ratio per class and of the per-group accuracies. With `--compare`, every
run named is evaluated the same way and the runs are printed and plotted side by side.

Several processes (hosts) evaluate together with the same flags as training's `mesh.*` config keys
(`--coordinator-address host:port --num-processes N --process-id I`, or srun / mpirun / a TPU pod slice
detected); process 0 prints and writes the results.
"""
from __future__ import annotations

import argparse
import pathlib

from gerne_jax.data import dataset

# The launch flags, named in errors as `distributed.initialize` needs.
LAUNCH_FLAGS = {"mode": "--distributed", "coordinator_address": "--coordinator-address",
                "num_processes": "--num-processes", "process_id": "--process-id"}
# `checkpoints.BEST_CHECKPOINTS` and `distributed.MODES`, spelled out: those modules load JAX, which
# `--help` should not wait for (tests/project/test_console.py holds them equal).
CHECKPOINT_HELP = "best_wga, best_bca, best_worst_class, latest, or a step number"
DISTRIBUTED_MODES = ("auto", "on", "off")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gerne-jax evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--workdir", help="a folder written by `gerne-jax train`")
    runs.add_argument("--compare", nargs="+", metavar="WORKDIR", help="several runs, side by side")
    parser.add_argument("--checkpoint", default="best_wga", help=CHECKPOINT_HELP)
    parser.add_argument("--split", default="test", choices=dataset.SPLITS)
    parser.add_argument("--tau", type=float, nargs="+", default=None,
                        help="tissue-ratio thresholds, each evaluated on its own (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="evaluate on another DATA_DIR than the run's")
    parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval, or "
                        "the first run's eval/compare_* with --compare)")
    add_launch_flags(parser.add_argument_group("several processes (docs/scaling.md)"))
    return parser.parse_args(argv)


def add_launch_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of a multi-process launch (`LAUNCH_FLAGS`), as train.py's `mesh.*` keys take them."""
    group.add_argument("--distributed", default="auto", choices=DISTRIBUTED_MODES,
                       help="auto: when --coordinator-address is given or srun, mpirun or a TPU pod is detected")
    group.add_argument("--coordinator-address", default="", help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=0, help="0: from the environment")
    group.add_argument("--process-id", type=int, default=-1, help="this process's id; -1: from the environment")


def main(argv: list[str] | None = None) -> int:
    """Evaluate trained runs on a split: per-group table, WGA, BCA and AUROC per tau.

    Raises InputError (naming the file or folder) for bad input.
    """
    args = parse_args(argv)
    from gerne_jax.core import cli, distributed
    from gerne_jax.evaluation import evaluate, reports

    distributed.initialize(args.distributed, args.coordinator_address, args.num_processes, args.process_id,
                           names=LAUNCH_FLAGS)
    cli.setup_logging(main_process=distributed.is_main_process())
    workdirs = [pathlib.Path(w) for w in (args.compare or [args.workdir])]
    taus_list = [(t,) for t in args.tau] if args.tau else None
    split_cache: dict = {}
    evaluations = {}
    for name, workdir in zip(evaluate.run_names(workdirs), workdirs):
        # A missing run, a damaged checkpoint or a DATA_DIR that is not one raises an InputError naming
        # the file or folder, which `cli.run_command` prints as one line.
        evaluations[name] = evaluate.evaluate_run(workdir, args.checkpoint, args.split, data_dir=args.data_dir,
                                                    taus_list=taus_list, split_cache=split_cache)

    if not distributed.is_main_process():  # every process predicted its share; process 0 reports
        return 0
    first = next(iter(evaluations.values()))
    for key in first.reports:
        print(f"\n=== {args.split} split, {key}, checkpoint {args.checkpoint} ===")
        if len(evaluations) == 1:
            print(reports.group_table(first.reports[key]))
        else:
            print(reports.comparison_table({name: e.reports[key] for name, e in evaluations.items()}))
    out = pathlib.Path(args.out) if args.out else workdirs[0] / "eval" / (
        f"compare_{args.checkpoint}_{args.split}" if args.compare else "")
    path = evaluate.write_results(evaluations, out, keyed_by_run=bool(args.compare))
    print(f"\nwrote {path} and PNGs beside it")
    return 0
