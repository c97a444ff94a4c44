"""Evaluates a trained run on a split, for any tissue-ratio thresholds (SPEC section 4).

  python evaluate.py --workdir runs/gerne [--checkpoint best_wga|best_bca|latest|STEP]
                     [--split test] [--tau 0.03 0.1 0.2] [--compare runs/erm runs/gerne ...]

Prints the per-group table and WGA, GBA, BCA, average accuracy, worst-class accuracy and AUROC for
each tau, and writes to `WORKDIR/eval/` (or `--out`): `<checkpoint>_<split>.json` and PNGs of the
error rate against tissue ratio per class and of the per-group accuracies. With `--compare`, every
run named is evaluated the same way and the runs are printed and plotted side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from gerne_jax import checkpoints, evaluation, experiment, files, input_pipeline, reports, train_step  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--workdir", help="a folder written by train.py")
    runs.add_argument("--compare", nargs="+", metavar="WORKDIR", help="several runs, side by side")
    parser.add_argument("--checkpoint", default="best_wga",
                        help=f"{', '.join(checkpoints.BEST_CHECKPOINTS)}, latest, or a step number")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--tau", type=float, nargs="+", default=None,
                        help="tissue-ratio thresholds, each evaluated on its own (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="evaluate on another DATA_DIR than the run's")
    parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval, or "
                        "the first run's eval/compare_* with --compare)")
    return parser.parse_args(argv)


def evaluate_run(workdir: pathlib.Path, checkpoint: str, split_name: str, data_dir: str | None,
                 split_cache: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Probabilities of every example of the split, the split's fields, and the checkpoint's meta."""
    config = experiment.load_config(workdir)
    data_dir = data_dir or config.data.dir
    if data_dir not in split_cache:
        split_cache[data_dir] = (input_pipeline.read_metadata(data_dir),
                                 input_pipeline.load_split(data_dir, split_name, in_memory=config.data.in_memory))
    metadata, split = split_cache[data_dir]
    mesh = train_step.make_mesh(config.mesh.num_devices or None)
    model = experiment.create_model(config)
    target = experiment.initial_state(config, model, tuple(split["image"].shape[1:]), mesh)
    run_checkpoints = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        state, meta = run_checkpoints.restore(checkpoint, target)
    except checkpoints.CheckpointError as error:
        raise checkpoints.CheckpointError(
            f"{error}\n(does the run's config match the data in {data_dir}? patches there are "
            f"{tuple(split['image'].shape[1:])}, model {config.model.name})") from None
    finally:
        run_checkpoints.close()
    probabilities = evaluation.predict_split(
        state, split, predict=evaluation.make_predict_fn(mesh), batch_size=config.data.eval_batch_size,
        channel_mean=metadata["channel_mean"], channel_std=metadata["channel_std"],
        desc=f"{workdir.name} {split_name}")
    return probabilities, split, {**meta, "taus": list(config.data.taus)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, force=True)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about read-only managers
    args = parse_args(argv)
    workdirs = [pathlib.Path(w) for w in (args.compare or [args.workdir])]
    names = _unique_names(workdirs)
    split_cache: dict[str, Any] = {}
    outputs: dict[str, tuple[np.ndarray, dict[str, Any], dict[str, Any]]] = {}
    for name, workdir in zip(names, workdirs):
        try:
            outputs[name] = evaluate_run(workdir, args.checkpoint, args.split, args.data_dir, split_cache)
        except (checkpoints.CheckpointError, FileNotFoundError, ValueError) as error:
            print(f"error: {workdir}: {error}", file=sys.stderr)
            return 2

    first_meta = next(iter(outputs.values()))[2]
    taus_list = [(t,) for t in args.tau] if args.tau else [tuple(first_meta["taus"])]
    results = {name: evaluation.report_per_tau(probabilities, split["label"], split["tissue_ratio"], taus_list)
               for name, (probabilities, split, _) in outputs.items()}
    out = pathlib.Path(args.out) if args.out else workdirs[0] / "eval" / (
        f"compare_{args.checkpoint}_{args.split}" if args.compare else "")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.checkpoint}_{args.split}"

    for key in results[names[0]]:
        print(f"\n=== {args.split} split, {key}, checkpoint {args.checkpoint} ===")
        if len(names) == 1:
            print(reports.group_table(results[names[0]][key]))
        else:
            print(reports.comparison_table({name: results[name][key] for name in names}))
        reports.plot_group_accuracy({name: results[name][key] for name in names},
                                    out / f"{stem}_groups_{key}.png")
    reports.plot_error_by_tissue_ratio(
        {name: (split["label"], probabilities, split["tissue_ratio"])
         for name, (probabilities, split, _) in outputs.items()},
        out / f"{stem}_error_vs_tissue_ratio.png", taus=sorted({t for taus in taus_list for t in taus}))
    document = {name: {"workdir": str(workdir), "checkpoint": args.checkpoint,
                       "checkpoint_step": outputs[name][2]["step"],
                       "selected_on_validation": outputs[name][2]["metrics"],
                       "split": args.split, "results": results[name]}
                for name, workdir in zip(names, workdirs)}
    _write_json(out / f"{stem}.json", document if args.compare else document[names[0]])
    print(f"\nwrote {out / f'{stem}.json'} and PNGs beside it")
    return 0


def _unique_names(workdirs: list[pathlib.Path]) -> list[str]:
    names = [w.name or str(w) for w in workdirs]
    return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def _write_json(path: pathlib.Path, document: Any) -> None:
    files.write_text_atomic(path, json.dumps(document, indent=2, allow_nan=True))


if __name__ == "__main__":
    sys.exit(main())
