"""JTT, Just Train Twice (Liu et al. 2021): the identification run's error set, and its upsampling.

Two `train.py` runs. The first (identification) is a plain ERM run of T steps. The second, with
`method.name = "jtt"`, reads the first one's checkpoint of step T (`method.jtt.identification_workdir`,
`method.jtt.identification_step`; 0 means its latest), predicts the training split with it and takes
the misclassified examples, the error set. It caches them in the identification workdir
(`jtt_errors_step{T}.json`), so every second run of a grid over lambda reuses one prediction pass. The
second run then trains ERM with every error example drawn `lambda` times as often as the other
examples of its class (`method.jtt.upweight`): class-balanced batches like ERM's, `A * B` draws per
class, each with probability proportional to its weight (1, or lambda for an error example).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from gerne_jax import checkpoints, distributed, files, groups, run_log
from gerne_jax.errors import ConfigError, InputError


def error_set(probabilities: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Whether each example is misclassified (argmax of its class probabilities `[M, K]` is not its label)."""
    return np.argmax(np.asarray(probabilities), axis=-1) != np.asarray(label)


def example_weights(errors: np.ndarray, upweight: float) -> np.ndarray:
    """Sampling weight of every training example: `upweight` (lambda) in the error set, 1 outside it."""
    if not (np.isfinite(upweight) and upweight >= 1.0):
        raise ConfigError(f"config method.jtt.upweight = {upweight} must be a number >= 1 (lambda: how many "
                          "times as often an error example is drawn)")
    return np.where(np.asarray(errors, bool), float(upweight), 1.0)


class UpsampledIndexSampler(groups.StepSampler):
    """Global example indices of a step's single batch, `[1, N]`, a pure function of (seed, step).

    Class y gets the plan's `A * B` places (class-balanced, like ERM's biased batch), drawn with
    replacement with probability proportional to each member's weight; the batch is then shuffled.
    Same interface as `input_pipeline.PairedIndexSampler` (`rng(step)`, `draw(rng)`).
    """

    def __init__(self, plan: groups.BatchPlan, label: np.ndarray, weights: np.ndarray, seed: int):
        label, weights = np.asarray(label), np.asarray(weights, np.float64)
        if weights.shape != label.shape or np.any(~np.isfinite(weights) | (weights < 0)):
            raise ValueError(f"weights must be {label.shape} finite non-negative numbers, got shape {weights.shape}")
        super().__init__(seed)
        self._members = [np.flatnonzero(label == y) for y in range(plan.num_classes)]
        self._probabilities = [weights[m] / weights[m].sum() for m in self._members]
        self._per_class = plan.biased_counts.sum(axis=1)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        drawn = [rng.choice(members, size=count, p=p)
                 for members, p, count in zip(self._members, self._probabilities, self._per_class)]
        return rng.permutation(np.concatenate(drawn))[None]

    def __call__(self, step: int) -> np.ndarray:
        return self.draw(self.rng(step))


def errors_file(workdir: str | pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"jtt_errors_step{step}.json"


def identification_errors(config: ml_collections.ConfigDict, train: dict[str, Any], metadata: dict[str, Any],
                          mesh: Mesh) -> np.ndarray:
    """The error set `[M]` (bool) of the identification run's checkpoint on this run's training split.

    Read from the identification workdir's cache when it is there, else predicted and cached. Raises
    ConfigError for a missing or unsuitable identification run (naming the key and the folder).
    """
    jtt = config.method.jtt
    workdir = pathlib.Path(jtt.identification_workdir)
    if not jtt.identification_workdir or not (workdir / run_log.CONFIG_FILE).is_file():
        raise ConfigError(f"config method.jtt.identification_workdir = {jtt.identification_workdir!r} must be "
                          "the workdir of a finished ERM run of T steps on the same data (train.py "
                          "--config configs/default.py:erm --config.training.steps=T)")
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        step = int(jtt.identification_step) or run.latest_step()
        if step is None or not run.has(step):
            raise ConfigError(f"config method.jtt.identification_step = {jtt.identification_step}: {workdir} has "
                              f"no checkpoint of that step; it has {run.describe_available()}")
    finally:
        run.close()
    num_examples = len(train["label"])
    cache = errors_file(workdir, step)
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["num_examples"] != num_examples:
            raise InputError(f"{cache} is the error set of a training split of {stored['num_examples']} "
                             f"examples, but {config.data.dir} has {num_examples}")
        errors = np.zeros(num_examples, bool)
        errors[stored["error_indices"]] = True
        return errors

    from gerne_jax import evaluation  # it imports the methods, which import this module

    identification = run_log.read_config(workdir)
    if pathlib.Path(identification.data.dir).resolve() != pathlib.Path(config.data.dir).resolve():
        raise ConfigError(f"config method.jtt.identification_workdir = {str(workdir)!r} was trained on "
                          f"{identification.data.dir}, not on data.dir = {config.data.dir}")
    state, _ = evaluation.restore_checkpoint(workdir, str(step), identification, tuple(train["image"].shape[1:]),
                                             mesh, config.data.dir)
    evaluator = evaluation.Evaluator(train, taus_list=[tuple(config.data.taus)],
                                     batch_size=config.data.eval_batch_size, mesh=mesh,
                                     channel_mean=metadata["channel_mean"], channel_std=metadata["channel_std"],
                                     name="JTT error set")
    errors = error_set(evaluator.predict(state), train["label"])
    if distributed.is_main_process():
        files.write_text_atomic(cache, json.dumps({
            "identification_step": step, "num_examples": num_examples,
            "error_indices": np.flatnonzero(errors).tolist()}))
    return errors
