"""ERM: one batch per step, plain cross-entropy; `method.erm.sampling` says how the batch is drawn.

- `groups` (default): the biased row of the same paired draws as GERNE (`samplers.PairedIndexSampler`):
  class-balanced, each group of a class at its training share, stratified by group. ERM and GERNE runs
  with one seed see the same biased batches (a controlled comparison); it is GERNE's beta = -1 without
  computing the less-biased gradient. The stratification reads the attribute.
- `class_balanced`: `A * B` examples of each class drawn uniformly within the class
  (`samplers.UpsampledIndexSampler` with equal weights): the same expected composition, attribute-free.
  For runs that must not see the attribute (JTT's identification run, the pseudo-groups' scoring run).
- `natural`: the batch drawn uniformly from the whole training split (`samplers.NaturalIndexSampler`),
  the plain ERM of the literature: classes and groups at their training shares.

The batch holds `N = K * A * B` examples in every mode.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gerne_jax.core.errors import ConfigError
from gerne_jax.data import samplers
from gerne_jax.data.groups import BIASED
from gerne_jax.train import method, train_step, trainer

SAMPLING = ("groups", "class_balanced", "natural")


class Erm(method.Method):
    """Single-batch cross-entropy (`method.name = "erm"`), its batch drawn per `method.erm.sampling`."""

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        self.config, self.attribute = context.config, attribute
        self.sampling = self.config.method.erm.sampling
        if self.sampling not in SAMPLING:
            raise ConfigError(f"config method.erm.sampling must be one of {SAMPLING}, got {self.sampling!r}")
        # Only GERNE extrapolates; the other methods' plans use beta = 0 (any valid value would do).
        self.plan = method.batch_plan(self.config, train["label"], attribute, c=self.config.method.c, beta=0.0)
        self.label = train["label"]

    def sampler(self, seed: int) -> samplers.StepSampler:
        if self.sampling == "natural":
            return samplers.NaturalIndexSampler(self.label.size, self.plan.batch_size, seed)
        if self.sampling == "class_balanced":
            return samplers.UpsampledIndexSampler(self.plan, self.label, np.ones(self.label.size), seed)
        return samplers.PairedIndexSampler(self.plan, self.label, self.attribute, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (BIASED,)

    def gradients(self) -> train_step.GradientFn:
        return train_step.single_batch

    def describe(self) -> str:
        n = self.plan.batch_size
        batch = {"groups": "the biased batch alone", "class_balanced": "class-balanced batches drawn without the "
                 "attribute", "natural": "batches drawn uniformly from the training split"}[self.sampling]
        return f"{self.plan.describe()}\nERM trains on {batch} ({n} examples per step)."
