"""GERNE: paired batches and the extrapolated gradient (docs/design.md §3), also on pseudo-groups.

Each step draws a biased and a less-biased batch (`samplers.PairedIndexSampler`) and trains on
`(1 + beta) L_lb - beta L_b` with beta in [-1, beta_max]: two per-batch gradients combined by the
optimiser (`train_step.two_gradients`), or with `method.fold_beta_into_loss` one gradient of the folded
loss (`train_step.folded`). Group resampling is GERNE with c = 1 and beta = 0 (the config switch
`resample`). With `method.pseudo_groups.scoring_workdir` set, the batches are planned on pseudo-groups
(unknown attributes, `gerne_jax.methods.pseudo_groups`) instead of the tissue-ratio bins.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gerne_jax.data import samplers
from gerne_jax.data.groups import BIASED, LESS_BIASED
from gerne_jax.methods import pseudo_groups
from gerne_jax.train import extrapolation, method, train_step, trainer


class Gerne(method.Method):
    """GERNE (`method.name = "gerne"`), on the tissue-ratio bins or on pseudo-groups."""

    pseudo: pseudo_groups.PseudoGroups | None = None  # the training groups, with unknown attributes

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        self.config, bin_names = context.config, None
        if pseudo_groups.enabled(self.config):  # unknown attributes: train on pseudo-groups; validate on the true ones
            self.pseudo = pseudo_groups.from_scoring_run(self.config, train, context.metadata, context.mesh, attribute)
            attribute, bin_names = self.pseudo.attribute, pseudo_groups.BIN_NAMES
        self.attribute, self.label = attribute, train["label"]
        settings = self.config.method
        self.plan = method.batch_plan(self.config, self.label, attribute, c=settings.c, beta=settings.beta,
                                      bin_names=bin_names)

    def sampler(self, seed: int) -> samplers.StepSampler:
        return samplers.PairedIndexSampler(self.plan, self.label, self.attribute, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (BIASED, LESS_BIASED)

    def gradients(self) -> train_step.GradientFn:
        if self.config.method.fold_beta_into_loss:
            return train_step.folded(extrapolation.beta_schedule(self.config.method))
        return train_step.two_gradients

    def describe(self) -> str:
        plan = self.plan.describe()
        return plan if self.pseudo is None else f"{plan}\n{self.pseudo.describe()}"

    def record(self, workdir: pathlib.Path) -> None:
        if self.pseudo is not None:
            pseudo_groups.write_report(workdir, self.pseudo)
