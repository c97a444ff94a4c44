"""The training loop: data, method, state, then steps with logging, evaluation and checkpoints.

`train_and_evaluate(config, workdir, method)` trains a training method (`gerne_jax.train.method`: the
default `Method.train`), asking it for nothing by name: it prepares the method on the training split
(`Context`), then builds the sampler, optimiser and step from what the method returns. It writes to the
workdir `config.json`, `data_spec.json`, `metrics.jsonl` (`gerne_jax.runs.run_log`), TensorBoard event
files under `tensorboard/` and orbax checkpoints (`checkpoints/latest`, `checkpoints/best_wga`,
`checkpoints/best_bca`, ...), and the method's own files (`Method.record`: with pseudo-groups their
precision and recall, `pseudo_groups.json`). `data_spec.json` (`run_log.DataSpec`), written once
before the first step, is what prediction and evaluation need of the DATA_DIR: its metadata (patch
size, channel names, dtype, level downsample, channel mean and std, ...), its tiling settings and
which slide is in which split, so the workdir predicts without its data. Started again on the same
workdir, it resumes from the latest checkpoint (the previous one if the latest is damaged) and ends
exactly where an uninterrupted run would; a DATA_DIR whose content no longer matches the stored data
spec is refused (an `InputError` naming `data_spec.json`). The config, the data and the model are
checked before anything is written (a bad one raises an `InputError` naming it); the run then holds
the workdir's `.lock` (`files.exclusive_lock`), so a second run on the same workdir stops at once,
naming the first. A DFR run (`gerne_jax.methods.dfr`, no step loop: its own `train`) writes its data spec
(`record_data_spec`) once its fit is saved.

Several processes (`gerne_jax.core.distributed`): every process runs this loop on the global mesh, feeds its
own slice of each batch, evaluates and saves checkpoints with the others (orbax coordinates them);
process 0 alone holds the lock and writes `config.json`, `data_spec.json`, `metrics.jsonl`, TensorBoard
events, the log and the progress bar. A SIGTERM that reaches some processes stops all of them at the
next logging, evaluation or checkpoint step, where they agree on it.

Precise BatchNorm (`training.precise_bn_batches` = K > 0, train-mode BatchNorm models only): before
every evaluation and every save, the state's BatchNorm statistics are recomputed with the current
parameters on K natural-distribution training batches (`gerne_jax.train.batch_stats`), so validation, the
best/latest checkpoints and the returned state all use population statistics rather than the running
averages of the method's resampled batches. They depend only on the parameters and (seed, step), so a
resumed run still ends exactly where an uninterrupted one does.

Accelerator-friendly: the state is donated to the jitted step, batches are prefetched to the devices
two deep, and the step's metrics stay on the device until a log, evaluation or checkpoint step fetches
them (where the finiteness check runs), so the host never waits for the device in between.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from tensorboard.summary import Writer

from gerne_jax.core import distributed, sharding
from gerne_jax.core.errors import ConfigError, Interrupted
from gerne_jax.data import dataset, normalisation
from gerne_jax.evaluation import evaluate
from gerne_jax.models import factory
from gerne_jax.models.resnet import ResNet
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.train import batch_stats, train_state, train_step
from gerne_jax.train.train_state import TrainState

log_info = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(Interrupted):
    """SIGTERM arrived; the state of `step` is saved and every file is closed."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method's `prepare` may read beside the training split: the run's config, its DATA_DIR's
    metadata and the mesh (e.g. to predict the split with another run's checkpoint)."""

    config: ml_collections.ConfigDict
    metadata: dict[str, Any]
    mesh: jax.sharding.Mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, method: Any,
                       config_defaults: ml_collections.ConfigDict | None = None) -> TrainState:
    """Trains `method` (a `gerne_jax.train.method.Method`, which imports this module for its default
    `train`: hence no annotation, the layers allow no import cycle) per `config` in `workdir` (resuming if it holds
    a run); returns the final train state.

    Raises `TrainingInterrupted` after saving when SIGTERM arrives, `NonFiniteLossError` when the
    loss stops being finite (the last good checkpoint stays), an `InputError` for a bad config or data
    (before anything is written) or a workdir that another run holds.
    """
    from gerne_jax.data import input_pipeline  # TensorFlow: the methods, which import this module, do not need it

    workdir = pathlib.Path(workdir)

    # ------------------------------------------------------------------------------------------
    # Data, method, model and initial state: validated before anything is written to the workdir.
    # ------------------------------------------------------------------------------------------
    if config.training.precise_bn_batches < 0:
        raise ConfigError(f"config training.precise_bn_batches must be >= 0 (0: off), got "
                          f"{config.training.precise_bn_batches}")
    data_spec = run_log.data_spec_of(config.data.dir)  # metadata and tiling report, read before any write
    metadata = data_spec.metadata
    train = input_pipeline.load_split(config.data.dir, "train", in_memory=config.data.in_memory)
    validation = input_pipeline.load_split(config.data.dir, "validation", in_memory=config.data.in_memory)
    attribute = dataset.attribute_from_tissue_ratio(train["tissue_ratio"], config.data.taus)
    mesh = sharding.mesh_of(config.mesh)
    method.prepare(train, attribute, Context(config, metadata, mesh))
    model = factory.create_model(config.model)
    train_step.check_reduction(model.norm, config.mesh.deterministic_reduction)
    state = train_state.initial_state(config.model, model, method.optimizer(), tuple(train["image"].shape[1:]),
                                      mesh, config.training.seed)
    with distributed.main_process_lock(workdir, "training"):
        # Every process checks, so that all stop on another run's config.
        run_log.check_config(workdir, config, config_defaults)
        record_data_spec(workdir, data_spec)
        if distributed.is_main_process():
            run_log.write_config(workdir, config, config_defaults)
            method.record(workdir)
        log_info.info("Training split: %d patches, %d devices in %d process(es). Batch plan (%s):\n%s",
                      len(train["label"]), mesh.size, jax.process_count(), config.method.name, method.describe())
        return _train(config, workdir, metadata, train, validation, method, mesh, model, state)


def record_data_spec(workdir: pathlib.Path, data_spec: run_log.DataSpec) -> None:
    """Stores the run's data spec (process 0), run while holding the workdir's lock; every process checks
    it first, so that all stop when a resumed run's DATA_DIR no longer holds the data it started on."""
    run_log.check_data_spec(workdir, data_spec)
    if distributed.is_main_process():
        run_log.write_data_spec(workdir, data_spec)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, metadata: dict[str, Any],
           train: dict[str, Any], validation: dict[str, Any], method: Any, mesh: jax.sharding.Mesh, model: ResNet,
           state: TrainState) -> TrainState:
    """The training loop of `train_and_evaluate`, run while it holds the workdir's lock."""
    from gerne_jax.data import input_pipeline

    is_main_process = distributed.is_main_process()

    # ------------------------------------------------------------------------------------------
    # Resume from the newest latest checkpoint that can be restored.
    # ------------------------------------------------------------------------------------------
    ckpt = checkpoints.RunCheckpoints(workdir)
    resumed = ckpt.restore_for_resume(state)
    start_step = 0
    if resumed is not None:
        start_step, state = resumed
        log_info.info("Resuming from step %d of %s", start_step, workdir)
    step_fn = train_step.make_train_step(
        model, mesh, method.gradients(), rows=len(method.rows), with_groups=method.uses_groups,
        divide_loss_by_num_classes=config.method.divide_loss_by_num_classes,
        deterministic_reduction=config.mesh.deterministic_reduction)
    standardise = normalisation.Standardiser.of(metadata, mesh, num_channels=train["image"].shape[-1])
    plan = method.plan
    group = (dataset.group_ids(train["label"], method.attribute, plan.num_classes, plan.num_attributes)
             if method.uses_groups else None)
    batches = input_pipeline.train_dataset(
        train["image"], train["label"], method.sampler(config.training.seed), start_step=start_step,
        rows=method.rows, flips=config.data.flips, rotations=config.data.rotations, group=group)
    # Source-dtype batches cross to the devices and are standardised there (`gerne_jax.data.normalisation`).
    device_batches = ({**batch, "image": standardise(batch["image"])}
                      for batch in sharding.prefetch_to_mesh(batches.as_numpy_iterator(), mesh, size=2))
    evaluator = evaluate.Evaluator(validation, model, taus_list=[tuple(config.data.taus)],
                                   batch_size=config.data.eval_batch_size, mesh=mesh, standardise=standardise,
                                   name="validation")
    precise_bn = config.training.precise_bn_batches if batch_stats.applies_to(model) else 0

    def with_precise_bn(state: TrainState, step: int) -> TrainState:
        """The state with BatchNorm statistics of K natural training batches at `step` (when on)."""
        if not precise_bn:
            return state
        batches = input_pipeline.natural_batches(
            train["image"], num_batches=precise_bn, batch_size=config.data.eval_batch_size,
            seed=config.training.seed, step=step)
        return batch_stats.recompute(state, model, batches.as_numpy_iterator(), mesh, standardise)

    # ------------------------------------------------------------------------------------------
    # Logging.
    # ------------------------------------------------------------------------------------------
    writer = Writer(str(workdir / "tensorboard")) if is_main_process else None
    metrics_log = run_log.MetricsLog(workdir, start_step) if is_main_process else None

    def log(step: int, split: str, values: dict[str, Any]) -> None:
        # The checkpoints saved in the background are on disk before a later step is logged: a run killed
        # after any log row resumes from the last save before that row.
        ckpt.wait_until_saved()
        if metrics_log is None:
            return
        for name, value in metrics_log.write(step, split, values).items():
            writer.add_scalar(f"{split}/{name}", value, step)
        writer.flush()

    pending: list[tuple[int, dict[str, jax.Array]]] = []  # step metrics not yet fetched from the device

    def fetch_checked() -> dict[str, Any] | None:
        """The pending metrics on the host (the last step's returned); stops at a non-finite loss."""
        if not pending:
            return None
        fetched = jax.device_get(pending)
        first, last = fetched[0][0], fetched[-1][0]
        pending.clear()
        saved = ckpt.latest_step()
        last_good = (f"the last good checkpoint is step {saved} in {ckpt.root}" if saved
                     else "no checkpoint was saved before it")
        for step, values in fetched:
            # The loss is that of the parameters before the step, the norm that of those after it.
            loss = values.get("loss", values.get("loss_less_biased"))
            if not (np.isfinite(loss) and np.isfinite(values["param_norm"])):
                raise NonFiniteLossError(
                    f"non-finite loss {loss} or parameters (norm {values['param_norm']}) at step {step} "
                    f"(steps {first}-{last} checked together); {last_good}. Lower "
                    f"optimizer.learning_rate or method.beta (allowed up to beta_max = "
                    f"{method.plan.beta_max:.4g}).")
        return fetched[-1][1]

    def meta(step: int, report: dict[str, Any] | None) -> dict[str, Any]:
        return {"step": step, "config": config.to_dict(), "metrics": report or {},
                "data_dir": str(pathlib.Path(config.data.dir).absolute())}

    # ------------------------------------------------------------------------------------------
    # Training loop.
    # ------------------------------------------------------------------------------------------
    stop_requested = []
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
    steps = config.training.steps
    last_report: dict[str, Any] | None = None
    progress = tqdm.tqdm(total=steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
                         disable=not is_main_process)
    step, tic, steps_timed = start_step, time.perf_counter(), 0
    try:
        while step < steps:
            state, step_metrics = step_fn(state, next(device_batches))
            step += 1
            steps_timed += 1
            pending.append((step, step_metrics))
            progress.update(1)
            logs_now = step % config.training.log_every == 0 or step == steps
            evaluates_now = step % config.training.eval_every == 0 or step == steps
            checkpoints_now = step % config.training.checkpoint_every == 0 or step == steps
            # A SIGTERM may reach the processes of a run at different steps: they agree on it at the steps
            # they all stop at anyway (one process alone stops at once).
            stopping = ((logs_now or evaluates_now or checkpoints_now or jax.process_count() == 1)
                        and distributed.any_process(bool(stop_requested)))
            saves_now = checkpoints_now or stopping
            if not (logs_now or evaluates_now or saves_now):
                continue
            last_metrics = fetch_checked()  # waits for the device: the rate below covers finished steps
            if evaluates_now or saves_now:
                state = with_precise_bn(state, step)
            if logs_now:
                rate = steps_timed * method.examples_per_step / (time.perf_counter() - tic)
                log(step, "train", {**last_metrics, "images_per_second": rate})
                postfix = {"loss": f"{last_metrics.get('loss', last_metrics.get('loss_less_biased')):.4f}"}
                if last_report:
                    postfix["val_wga"] = f"{last_report['worst_group_accuracy']:.3f}"
                progress.set_postfix(postfix)
            if evaluates_now:
                variables = {"params": state.params, "batch_stats": state.batch_stats}
                last_report = evaluator.run(variables)[evaluate.tau_key(config.data.taus)]
                log(step, "validation", evaluate.scalar_metrics(last_report))
                improved = ckpt.update_best(step, state, meta(step, last_report))
                if is_main_process:
                    progress.write(f"step {step}: validation WGA {last_report['worst_group_accuracy']:.4f}, "
                                   f"BCA {last_report['balanced_class_accuracy']:.4f}"
                                   + (f" (new {', '.join(improved)})" if improved else ""))
            if saves_now:
                ckpt.save_latest(step, state, meta(step, last_report))
            if logs_now or evaluates_now or saves_now:  # images/s excludes evaluation and saving
                tic, steps_timed = time.perf_counter(), 0
            if stopping:
                log_info.info("SIGTERM: saved step %d to %s; exiting.", step, ckpt.root)
                raise TrainingInterrupted(step)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
        ckpt.close()
        if metrics_log is not None:
            metrics_log.close()
            writer.close()
    return state
