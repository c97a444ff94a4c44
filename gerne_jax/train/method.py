"""The training-method interface: what the training loop asks of a method, and the method's `train`.

A method (`gerne_jax.methods`: ERM, GERNE, GroupDRO, JTT, ...; registered by `method.name` in
`gerne_jax.methods.registry`) decides everything that differs between methods and must agree: after
`prepare` on the training split, its batch plan and sampler (which examples each step draws, and which
rows of the draws the step loads), its optimiser and its gradient function (`train_step.GradientFn`).
The shared loop (`trainer.train_and_evaluate`) does the rest: data, state, resuming, logging,
evaluation and checkpoints. A method with no step loop (DFR) overrides `train` instead.
"""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
import numpy as np
import optax

from gerne_jax.data import dataset, groups, samplers
from gerne_jax.train import extrapolation, train_step, trainer
from gerne_jax.train.train_state import TrainState


class Method:
    """A training method. The shared loop calls `prepare` first, which sets `config`, `plan` and
    `attribute`, then the other hooks; a subclass implements the hooks, or overrides `train` alone."""

    config: ml_collections.ConfigDict  # the run's config
    plan: groups.BatchPlan             # the batch plan of the training split
    attribute: np.ndarray              # [M] the attribute bins the plan was made on (the groups trained on)
    uses_groups: bool = False          # whether the step needs each example's group id (`batch["group"]`)

    def train(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              config_defaults: ml_collections.ConfigDict | None = None) -> TrainState:
        """Trains per `config` in `workdir` (resuming if it holds a run); returns the final train state."""
        return trainer.train_and_evaluate(config, workdir, self, config_defaults)

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        """Plans the method on the training split (`input_pipeline.load_split`) whose attribute bins (of
        `data.taus`) are `attribute`. Raises ConfigError naming the config key at fault."""
        raise NotImplementedError(f"{type(self).__name__}.prepare")

    def sampler(self, seed: int) -> samplers.StepSampler:
        """The training split's batch indices of every step (`gerne_jax.data.samplers`)."""
        raise NotImplementedError(f"{type(self).__name__}.sampler")

    @property
    def rows(self) -> tuple[int, ...]:
        """The rows of the sampler's draws a step trains on: `(BIASED, LESS_BIASED)` for a pair."""
        raise NotImplementedError(f"{type(self).__name__}.rows")

    def gradients(self) -> train_step.GradientFn:
        """The step's gradient function (`train_step.single_batch`, `two_gradients`, ...)."""
        raise NotImplementedError(f"{type(self).__name__}.gradients")

    def describe(self) -> str:
        """The batch plan and what the method trains on, for the log."""
        raise NotImplementedError(f"{type(self).__name__}.describe")

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        """The optimiser (`config.optimizer`, with the beta schedule of `config.method`)."""
        return extrapolation.optimizer_from_config(self.config.optimizer, self.config.training.steps,
                                                   extrapolation.beta_schedule(self.config.method))

    @property
    def examples_per_step(self) -> int:
        return len(self.rows) * self.plan.batch_size

    def record(self, workdir: pathlib.Path) -> None:
        """Writes the method's own files into the workdir (process 0, under the run's lock); none by default."""


def batch_plan(config: ml_collections.ConfigDict, label: np.ndarray, attribute: np.ndarray, *, c: float,
               beta: float, bin_names: tuple[str, ...] | None = None) -> groups.BatchPlan:
    """`groups.make_batch_plan` of the training split per `config.method` and `training.batch_per_group`.

    `bin_names` default to the tissue-ratio bins of `data.taus`.
    """
    bin_names = bin_names or dataset.tissue_bin_names(config.data.taus)
    counts = dataset.group_counts(label, attribute, len(dataset.CLASS_NAMES), len(bin_names))
    return groups.make_batch_plan(counts, c=c, beta=beta, batch_per_group=config.training.batch_per_group,
                                  corr=config.method.corr, empty_group=config.method.empty_group,
                                  class_names=dataset.CLASS_NAMES, bin_names=bin_names)
