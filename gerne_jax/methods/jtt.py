"""JTT, Just Train Twice (Liu et al. 2021): the identification run's error set, and its upsampling.

Two `train.py` runs. The first (identification) is a plain ERM run of T steps. The second, with
`method.name = "jtt"`, reads the first one's checkpoint of step T (`method.jtt.identification_workdir`,
`method.jtt.identification_step`; 0 means its latest), predicts the training split with it and takes
the misclassified examples, the error set. The predictions are cached in the identification workdir
(`gerne_jax.methods.reference_run`), so every second run of a grid over lambda reuses one prediction pass. The
second run then trains ERM with every error example drawn `lambda` times as often as the other
examples of its class (`method.jtt.upweight`): class-balanced batches like ERM's, `A * B` draws per
class, each with probability proportional to its weight (1, or lambda for an error example).
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core.errors import ConfigError
from gerne_jax.data import groups
from gerne_jax.methods import reference_run
from gerne_jax.runs import checkpoints


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


def identification_errors(config: ml_collections.ConfigDict, train: dict[str, Any], metadata: dict[str, Any],
                          mesh: Mesh) -> np.ndarray:
    """The error set `[M]` (bool) of the identification run's checkpoint on this run's training split.

    The checkpoint's probabilities come from `reference_run` (cached in the identification workdir).
    Raises ConfigError for a missing or unsuitable identification run (naming the key and the folder).
    """
    settings = config.method.jtt
    step = int(settings.identification_step)
    probabilities = reference_run.training_probabilities(
        config, train, metadata, mesh, workdir=settings.identification_workdir,
        checkpoint=str(step) if step else checkpoints.LATEST,  # 0: the run's latest step
        workdir_key="method.jtt.identification_workdir", checkpoint_key="method.jtt.identification_step",
        expected_run="a finished ERM run of T steps on the same data (train.py --config "
                     "configs/default.py:erm --config.training.steps=T)")
    return error_set(probabilities, train["label"])
