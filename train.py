"""Trains a patch-wise tumour classifier with GERNE or ERM (SPEC sections 3 to 5).

  python train.py --config configs/gerne.py --workdir runs/gerne [--config.method.beta=1.5]

Writes to the workdir: `config.json`, `metrics.jsonl` (one JSON line per log or evaluation),
TensorBoard event files under `tensorboard/`, and orbax checkpoints (`checkpoints/latest`,
`checkpoints/best_wga`, `checkpoints/best_bca`, ...). Started again on the same workdir, it
resumes from the latest checkpoint and ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags
from ml_collections import config_flags
from tensorboard.summary import Writer

from gerne_jax import checkpoints, evaluation, experiment, files, groups, input_pipeline, train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (`:arg` for presets).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])

CLASS_NAMES = experiment.CLASS_NAMES
log_info = logging.getLogger("train")
# Config sections that may change when a run is resumed (extending a run's length is fine).
RESUMABLE_CHANGES = ("training.steps", "training.eval_every", "training.checkpoint_every",
                     "training.log_every")


class NonFiniteLossError(RuntimeError):
    pass


def check_resumable(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose saved config differs in anything but the run length."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = experiment.flatten(json.loads(path.read_text()))
    current = experiment.flatten(json.loads(config.to_json()))
    changed = sorted(k for k in saved.keys() | current.keys()
                     if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"{workdir} holds a run with another config ({details}); "
                         "use a new --workdir or the saved config")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Trains per `config` in `workdir` (resuming if it holds a run); returns the final train state."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(workdir, config)
    (workdir / "config.json").write_text(config.to_json(indent=2))
    K = len(CLASS_NAMES)
    taus = tuple(config.data.taus)

    # ------------------------------------------------------------------------------------------
    # Data: the training split, its groups and the batch plan.
    # ------------------------------------------------------------------------------------------
    metadata = input_pipeline.read_metadata(config.data.dir)
    train = input_pipeline.load_split(config.data.dir, "train", in_memory=config.data.in_memory)
    validation = input_pipeline.load_split(config.data.dir, "validation", in_memory=config.data.in_memory)
    attribute = groups.attribute_from_tissue_ratio(train["tissue_ratio"], taus)
    counts = groups.group_counts(train["label"], attribute, K, len(taus) + 1)
    gerne = experiment.is_paired(config)
    plan = groups.make_batch_plan(
        counts, c=config.method.c, beta=config.method.beta if gerne else 0.0,
        batch_per_group=config.training.batch_per_group, corr=config.method.corr,
        empty_group=config.method.empty_group, class_names=CLASS_NAMES,
        bin_names=groups.tissue_bin_names(taus))
    log_info.info("Training split: %d patches. Batch plan (%s):\n%s", len(train["label"]),
                 config.method.name, plan.describe())
    if not gerne:
        log_info.info("ERM trains on the biased batch alone (%d examples per step).", plan.batch_size)
    channel_mean, channel_std = metadata["channel_mean"], metadata["channel_std"]

    # ------------------------------------------------------------------------------------------
    # Model, optimiser, state; resume from the latest checkpoint.
    # ------------------------------------------------------------------------------------------
    mesh = train_step.make_mesh(config.mesh.num_devices or None)
    model = experiment.create_model(config)
    state = experiment.initial_state(config, model, tuple(train["image"].shape[1:]), mesh)
    ckpt = checkpoints.RunCheckpoints(workdir)
    start_step = ckpt.latest_step() or 0
    if start_step:
        state, _ = ckpt.restore(checkpoints.LATEST, state)
        log_info.info("Resuming from step %d of %s", start_step, workdir)
    step_fn = train_step.make_train_step(
        model, learning_rate=experiment.learning_rate_schedule(config), beta=experiment.beta_schedule(config),
        fold_beta_into_loss=config.method.fold_beta_into_loss,
        divide_loss_by_num_classes=config.method.divide_loss_by_num_classes, mesh=mesh)
    predict = evaluation.make_predict_fn(mesh)

    batches = input_pipeline.train_dataset(
        train["image"], train["label"], attribute, plan, seed=config.training.seed,
        channel_mean=channel_mean, channel_std=channel_std, start_step=start_step,
        flips=config.data.flips, rotations=config.data.rotations).as_numpy_iterator()

    # ------------------------------------------------------------------------------------------
    # Logging and evaluation.
    # ------------------------------------------------------------------------------------------
    writer = Writer(str(workdir / "tensorboard"))
    metrics_file = open_metrics_log(workdir / "metrics.jsonl", start_step)

    def log(step: int, split: str, values: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in values.items() if np.ndim(v) == 0}
        metrics_file.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        metrics_file.flush()
        for name, value in scalars.items():
            writer.add_scalar(f"{split}/{name}", value, step)
        writer.flush()

    def evaluate(step: int) -> dict[str, Any]:
        probabilities = evaluation.predict_split(
            state, validation, predict=predict, batch_size=config.data.eval_batch_size,
            channel_mean=channel_mean, channel_std=channel_std, desc=f"validation @ {step}")
        report = evaluation.report_per_tau(probabilities, validation["label"],
                                           validation["tissue_ratio"], [taus])
        report = report[evaluation.tau_key(taus)]
        log(step, "validation", evaluation.scalar_metrics(report, CLASS_NAMES))
        return report

    def meta(step: int, report: dict[str, Any] | None) -> dict[str, Any]:
        return {"step": step, "config": json.loads(config.to_json()), "metrics": report or {},
                "data_dir": str(pathlib.Path(config.data.dir).absolute())}

    # ------------------------------------------------------------------------------------------
    # Training loop.
    # ------------------------------------------------------------------------------------------
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
    last_report: dict[str, Any] | None = None
    progress = tqdm.tqdm(total=config.training.steps, initial=start_step, desc="training", unit="step",
                         dynamic_ncols=True)
    step = start_step
    tic = time.perf_counter()
    while step < config.training.steps:
        batch = next(batches)
        if not gerne:
            batch = {name: value[:1] for name, value in batch.items()}
        new_state, step_metrics = step_fn(state, train_step.shard_batch(batch, mesh))
        step_metrics = jax.device_get(step_metrics)
        loss = step_metrics.get("loss", step_metrics.get("loss_less_biased"))
        if not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {step + 1}; the last good checkpoint is step "
                f"{ckpt.latest_step()} in {ckpt.root}. Lower optimizer.learning_rate or method.beta "
                f"(allowed up to beta_max = {plan.beta_max:.4g}).")
        state, step = new_state, step + 1
        progress.update(1)
        logs_now = step % config.training.log_every == 0 or step == config.training.steps
        if logs_now:  # the rate covers training steps only, not the evaluation below
            rate = config.training.log_every * patch_count(batch) / (time.perf_counter() - tic)
        if step % config.training.eval_every == 0 or step == config.training.steps:
            last_report = evaluate(step)
            improved = ckpt.update_best(step, state, meta(step, last_report))
            progress.write(f"step {step}: validation WGA {last_report['worst_group_accuracy']:.4f}, "
                           f"BCA {last_report['balanced_class_accuracy']:.4f}"
                           + (f" (new {', '.join(improved)})" if improved else ""))
        if logs_now:
            log(step, "train", {**step_metrics, "images_per_second": rate})
            postfix = {"loss": f"{float(loss):.4f}"}
            if last_report:
                postfix["val_wga"] = f"{last_report['worst_group_accuracy']:.3f}"
            progress.set_postfix(postfix)
            tic = time.perf_counter()
        if (step % config.training.checkpoint_every == 0 or step == config.training.steps
                or stop_requested):
            ckpt.save_latest(step, state, meta(step, last_report))
        if stop_requested:
            log_info.info("SIGTERM: saved step %d to %s; exiting.", step, ckpt.root)
            break
    progress.close()
    ckpt.close()
    writer.close()
    metrics_file.close()
    if stop_requested:
        # Everything is saved and closed. Skip interpreter teardown: the tf.data iterator's destructor
        # can wait for a worker thread that waits for the GIL, which hung runs after SIGTERM.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    return state


def main(argv: list[str]) -> None:
    del argv
    # Our messages at INFO; the libraries' (orbax, TFDS) chatter only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    log_info.setLevel(logging.INFO)
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


def open_metrics_log(path: pathlib.Path, start_step: int):
    """Opens metrics.jsonl for appending, first dropping lines of steps after `start_step`.

    A resumed run redoes the steps after its last checkpoint; their old lines would be duplicates.
    """
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= start_step]
        files.write_text_atomic(path, "".join(kept))
    return path.open("a")


def patch_count(batch: dict[str, np.ndarray]) -> int:
    return int(np.prod(batch["label"].shape))


if __name__ == "__main__":
    app.run(main)
