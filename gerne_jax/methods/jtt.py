"""JTT, Just Train Twice (Liu et al. 2021): the identification run's error set, and its upsampling.

Two `train.py` runs. The first (identification) is a plain ERM run of T steps. The second, with
`method.name = "jtt"`, reads the first one's checkpoint of step T (`method.jtt.identification_workdir`,
`method.jtt.identification_step`; 0 means its latest), predicts the training split with it and takes
the misclassified examples, the error set. The predictions are cached in the identification workdir
(`gerne_jax.methods.reference_run`), so every second run of a grid over lambda reuses one prediction pass. The
second run then trains ERM with every error example drawn `lambda` times as often as the other
examples of its class (`method.jtt.upweight`): class-balanced batches like ERM's, `A * B` draws per
class, each with probability proportional to its weight (1, or lambda for an error example):
`samplers.UpsampledIndexSampler`.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core.errors import ConfigError
from gerne_jax.methods import reference_run, weighted_batch
from gerne_jax.runs import checkpoints
from gerne_jax.train import trainer


def error_set(probabilities: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Whether each example is misclassified (argmax of its class probabilities `[M, K]` is not its label)."""
    return np.argmax(np.asarray(probabilities), axis=-1) != np.asarray(label)


def example_weights(errors: np.ndarray, upweight: float) -> np.ndarray:
    """Sampling weight of every training example: `upweight` (lambda) in the error set, 1 outside it."""
    if not (np.isfinite(upweight) and upweight >= 1.0):
        raise ConfigError(f"config method.jtt.upweight = {upweight} must be a number >= 1 (lambda: how many "
                          "times as often an error example is drawn)")
    return np.where(np.asarray(errors, bool), float(upweight), 1.0)


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


class Jtt(weighted_batch.WeightedBatch):
    """JTT's second run (`method.name = "jtt"`): ERM's single class-balanced batch, drawn with the
    identification run's error set upweighted by lambda."""

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        errors = identification_errors(context.config, train, context.metadata, context.mesh)
        self.prepare_weighted(train, attribute, context, example_weights(errors, context.config.method.jtt.upweight))

    def describe(self) -> str:
        upweighted = int(np.sum(self.weights > 1))
        return (f"{self.plan.describe()}\nJTT trains on one class-balanced batch ({self.plan.batch_size} examples "
                f"per step) drawn with the identification run's {upweighted} misclassified training examples (of "
                f"{self.weights.size}) upweighted x {self.config.method.jtt.upweight:g}.")
