"""ERM's single class-balanced batch with each example drawn by its weight: what JTT and ratio_weighted share.

A subclass computes the training examples' sampling weights in `prepare` and hands them to
`prepare_weighted`; the batch is the biased row's class-balanced size, drawn per class with
probability proportional to the weights (`samplers.UpsampledIndexSampler`), and trained with the mean loss.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gerne_jax.data import samplers
from gerne_jax.data.groups import BIASED
from gerne_jax.train import method, train_step, trainer


class WeightedBatch(method.Method):
    """One class-balanced batch drawn by per-example weights (set by `prepare_weighted`)."""

    def prepare_weighted(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context,
                         weights: np.ndarray) -> None:
        self.config, self.attribute, self.label, self.weights = context.config, attribute, train["label"], weights
        # The plan only sizes the class-balanced batch (the taus only name the groups); beta = 0 is any valid value.
        self.plan = method.batch_plan(self.config, self.label, attribute, c=self.config.method.c, beta=0.0)

    def sampler(self, seed: int) -> samplers.StepSampler:
        return samplers.UpsampledIndexSampler(self.plan, self.label, self.weights, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (BIASED,)  # the sampler's single row

    def gradients(self) -> train_step.GradientFn:
        return train_step.single_batch
