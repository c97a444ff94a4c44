"""Training methods: one value, built once from the config, that decides the sampler, optimiser and step.

A method decides three things that must agree: which batches the input pipeline yields (GERNE's pair,
or the biased batch alone: its `plan` and `rows`, which `input_pipeline.training_batches(method, ...)`
reads), the optimiser (always `extrapolation.make_optimizer`, with the method's learning-rate and beta
schedules), and the kind of train step (two gradients, folded, single batch). `TrainingMethod` makes
all three from the same fields, so they cannot disagree; it imports no TensorFlow. The methods
(docs/design.md §3):

- `gerne`: paired batches; beta in [-1, beta_max]; two gradients, or the folded one-gradient path
  with `method.fold_beta_into_loss`. Group resampling is `gerne` with c = 1 and beta = 0.
- `erm`: the biased batch alone. It is the biased row of the same paired draws, so ERM and GERNE runs
  with one seed see the same biased batches (a controlled comparison).

A new method (GroupDRO, JTT, ...) is a new `name` here: its sampler rows, its step and its config keys.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from gerne_jax import dataset, extrapolation, groups, models, train_step
from gerne_jax.errors import ConfigError
from gerne_jax.groups import BIASED, LESS_BIASED

METHOD_NAMES = ("gerne", "erm")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant or cosine decay over `training.steps`, after `optimizer.warmup_steps` of linear warm-up."""
    opt, steps = config.optimizer, config.training.steps
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.learning_rate, max(steps - opt.warmup_steps, 1))
    else:
        raise ConfigError(f"config optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")
    if opt.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def beta_schedule(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`method.beta`, or a linear ramp to it from 0 (resampling) over `method.beta_warmup_steps`."""
    if config.method.beta_warmup_steps > 0:
        return optax.linear_schedule(0.0, config.method.beta, config.method.beta_warmup_steps)
    return config.method.beta


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The optimiser of every method (its structure depends on the config only, not on the data)."""
    return extrapolation.make_optimizer(learning_rate_schedule(config), beta_schedule(config),
                                        momentum=config.optimizer.momentum,
                                        weight_decay=config.optimizer.weight_decay)


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """A training method for one training split (see the module docstring)."""

    name: str
    plan: groups.BatchPlan
    config: ml_collections.ConfigDict

    @property
    def rows(self) -> tuple[int, ...]:
        """The rows of the paired draws a step trains on."""
        return (BIASED,) if self.name == "erm" else (BIASED, LESS_BIASED)

    @property
    def paired(self) -> bool:
        return len(self.rows) == 2

    @property
    def examples_per_step(self) -> int:
        return len(self.rows) * self.plan.batch_size

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        return make_optimizer(self.config)

    def train_step(self, model: models.ResNet, mesh: Mesh) -> train_step.StepFn:
        fold = self.paired and self.config.method.fold_beta_into_loss
        return train_step.make_train_step(
            model, mesh, paired=self.paired, fold_beta=beta_schedule(self.config) if fold else None,
            divide_loss_by_num_classes=self.config.method.divide_loss_by_num_classes)

    def describe(self) -> str:
        plan = self.plan.describe()
        if self.paired:
            return plan
        return f"{plan}\nERM trains on the biased batch alone ({self.plan.batch_size} examples per step)."


def from_config(config: ml_collections.ConfigDict, label: np.ndarray,
                attribute: np.ndarray) -> TrainingMethod:
    """The configured method for a training split with these labels and attribute bins.

    Raises ConfigError naming the config key at fault (for GERNE's batch plan with the allowed range
    on the first line and the alpha table below).
    """
    name = config.method.name
    if name not in METHOD_NAMES:
        raise ConfigError(f"config method.name must be one of {METHOD_NAMES}, got {name!r}")
    counts = dataset.group_counts(label, attribute, len(dataset.CLASS_NAMES), len(config.data.taus) + 1)
    # ERM draws the pair's biased row; its plan's beta is not used, so any valid value does.
    plan = groups.make_batch_plan(
        counts, c=config.method.c, beta=config.method.beta if name == "gerne" else 0.0,
        batch_per_group=config.training.batch_per_group, corr=config.method.corr,
        empty_group=config.method.empty_group, class_names=dataset.CLASS_NAMES,
        bin_names=dataset.tissue_bin_names(config.data.taus))
    return TrainingMethod(name=name, plan=plan, config=config)
