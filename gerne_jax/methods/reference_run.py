"""Another run's predictions on this run's training split: the input of JTT and of pseudo-group GERNE.

JTT (`gerne_jax.methods.jtt`) upweights the training examples an identification run misclassifies; GERNE with
unknown attributes (`gerne_jax.methods.pseudo_groups`) groups them by a scoring run's true-class probability.
Both read one checkpoint of another `train.py` run (the reference run) and need its class probabilities
`[M, K]` on the training split of this run's `data.dir`. `training_probabilities` checks that the run
exists, holds that checkpoint and was trained on the same `data.dir`, predicts the split once and caches
the probabilities in the reference workdir (`train_probabilities_<checkpoint>.npz`, with the checkpoint's
step in the name), so every run of a grid over the second run's settings reuses one prediction pass.
"""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core import distributed, files
from gerne_jax.core.errors import ConfigError, InputError
from gerne_jax.data import normalisation
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.runs import run as run_lib


def cache_file(workdir: str | pathlib.Path, checkpoint: str, step: int) -> pathlib.Path:
    """Where the probabilities of `workdir`'s checkpoint (a name such as best_bca, or a step) are cached.

    Named checkpoints carry their step: a run continued later has another best_bca, and a new cache.
    """
    stem = f"step{step}" if str(checkpoint).isdigit() else f"{checkpoint}_step{step}"
    return pathlib.Path(workdir) / f"train_probabilities_{stem}.npz"


def checkpoint_step(workdir: str | pathlib.Path, checkpoint: str, key: str) -> int:
    """The step of a run's checkpoint (`best_bca`, ..., `latest` or a step of latest), or a ConfigError
    naming the config key `key` and the checkpoints the run has."""
    names = (*checkpoints.BEST_CHECKPOINTS, checkpoints.LATEST)
    if not (str(checkpoint).isdigit() or checkpoint in names):
        raise ConfigError(f"config {key} = {checkpoint!r} must be one of {list(names)} or a step number")
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        if not run.has(checkpoint):
            raise ConfigError(f"config {key} = {checkpoint!r}: {workdir} has no such checkpoint; it has "
                              f"{run.describe_available()}")
        return int(checkpoint) if str(checkpoint).isdigit() else run.latest_step(str(checkpoint))
    finally:
        run.close()


def training_probabilities(config: ml_collections.ConfigDict, train: dict[str, Any], metadata: dict[str, Any],
                           mesh: Mesh, *, workdir: str, checkpoint: str, workdir_key: str, checkpoint_key: str,
                           expected_run: str) -> np.ndarray:
    """Class probabilities `[M, K]` (float32) of the reference run's checkpoint on this run's training split.

    Args:
      config: this run's config (its `data.dir` and `data.eval_batch_size`).
      train, metadata: this run's training split (`input_pipeline.load_split`) and its DATA_DIR's metadata.
      mesh: the devices to predict on.
      workdir, checkpoint: the reference run and its checkpoint (best_wga|best_bca|...|latest|STEP).
        A step must be one that the run still keeps in `checkpoints/latest/`.
      workdir_key, checkpoint_key: the config keys that hold them, named in errors.
      expected_run: what the reference run should be, for the message of a missing one.

    Read from the reference workdir's cache when it is there (checked against this split's labels), else
    predicted and cached. Raises ConfigError naming the key for a missing run or checkpoint or a run
    trained on another `data.dir`, InputError for a cache of another training split.
    """
    path = pathlib.Path(workdir)
    if not workdir or not (path / run_log.CONFIG_FILE).is_file():
        raise ConfigError(f"config {workdir_key} = {workdir!r} must be the workdir of {expected_run}")
    reference = run_log.read_config(path)
    if pathlib.Path(reference.data.dir).resolve() != pathlib.Path(config.data.dir).resolve():
        raise ConfigError(f"config {workdir_key} = {str(path)!r} was trained on {reference.data.dir}, "
                          f"not on data.dir = {config.data.dir}")
    step = checkpoint_step(path, str(checkpoint), checkpoint_key)
    if checkpoint == checkpoints.LATEST:  # one cache per state: latest of step S is step S
        checkpoint = str(step)
    label = np.asarray(train["label"])
    cache = cache_file(path, str(checkpoint), step)
    if cache.is_file():
        with np.load(cache) as stored:
            if not np.array_equal(stored["label"], label):
                raise InputError(f"{cache} holds the predictions of a training split of {stored['label'].size} "
                                 f"examples with other labels than the {label.size} of {config.data.dir}; "
                                 "the data were rewritten after that run: delete the file to predict again")
            return stored["probabilities"]

    from gerne_jax.evaluation import evaluate  # it imports the methods, which import JTT and this module

    model, _ = run_lib.Run.open(path, mesh=mesh).restore_model(str(checkpoint), tuple(train["image"].shape[1:]),
                                                               config.data.dir)
    evaluator = evaluate.Evaluator(train, model.module, taus_list=[tuple(config.data.taus)],
                                   batch_size=config.data.eval_batch_size, mesh=mesh,
                                   standardise=normalisation.Standardiser.of(metadata, mesh,
                                                                             num_channels=train["image"].shape[-1]),
                                   name=f"{path.name} {checkpoint} on the training split")
    probabilities = evaluator.predict(model.variables).astype(np.float32)
    if distributed.is_main_process():
        with files.atomic_write(cache) as temporary, open(temporary, "wb") as file:
            np.savez(file, probabilities=probabilities, label=label, step=step, checkpoint=str(checkpoint))
    return probabilities
