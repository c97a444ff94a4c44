"""ERM: the biased batch alone (class-balanced, natural group shares within each class).

ERM trains on the biased row of the same paired draws as GERNE (`samplers.PairedIndexSampler`), so ERM
and GERNE runs with one seed see the same biased batches (a controlled comparison); it is GERNE's
beta = -1 without computing the less-biased gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gerne_jax.data import samplers
from gerne_jax.data.groups import BIASED
from gerne_jax.train import method, train_step, trainer


class Erm(method.Method):
    """Single-batch cross-entropy on the biased row of the paired draws (`method.name = "erm"`)."""

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        self.config, self.attribute = context.config, attribute
        # Only GERNE extrapolates; the other methods' plans use beta = 0 (any valid value would do).
        self.plan = method.batch_plan(self.config, train["label"], attribute, c=self.config.method.c, beta=0.0)
        self.label = train["label"]

    def sampler(self, seed: int) -> samplers.StepSampler:
        return samplers.PairedIndexSampler(self.plan, self.label, self.attribute, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (BIASED,)

    def gradients(self) -> train_step.GradientFn:
        return train_step.single_batch

    def describe(self) -> str:
        n = self.plan.batch_size
        return f"{self.plan.describe()}\nERM trains on the biased batch alone ({n} examples per step)."
