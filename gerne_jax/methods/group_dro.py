"""GroupDRO (Sagawa et al. 2020): online group weights by exponentiated gradient, and the robust loss.

Each step measures the mean loss `L_g` of every group `g = y * A + a` present in the (global) batch,
moves the group weights `q` towards the worst groups,

    q_g <- q_g * exp(eta * (L_g + C / sqrt(n_g)))   for the groups present,   then q <- q / sum(q),

and trains on the robust loss `sum_g q_g L_g` with the new `q` held fixed (its gradient is
`sum_g q_g grad L_g`). `C` is the group adjustment (0: none) and `n_g` the group's training examples,
so small groups, whose training loss understates their generalisation gap, get extra weight. A group
absent from the batch keeps its weight before normalisation (the official code's update with a
zero loss). The losses entering `q` are plain cross-entropies, so `eta` means what it means in the
paper whatever `method.divide_loss_by_num_classes` does to the gradient's scale.

`q` lives in the optimiser state (`track_group_weights`, chained before the common optimiser by
`GroupDro.optimizer`): it is saved and restored with every checkpoint, so a resumed run continues
with the weights it stopped with. The step reads it (`group_weights`), computes the new weights with
`update_group_weights` and hands them to the optimiser as the extra argument `group_weights`.

The method (`GroupDro`, `method.name = "group_dro"`) trains on one batch with each example's group:
group-balanced (`method.group_dro.sampling = "balanced"`: the less-biased row with c = 1, as in the
official GroupDRO runs) or natural (the biased row).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gerne_jax.core.errors import ConfigError
from gerne_jax.data import samplers
from gerne_jax.data.groups import BIASED, LESS_BIASED
from gerne_jax.train import method, train_step, trainer

SAMPLING = ("balanced", "natural")


class GroupWeightsState(NamedTuple):
    """GroupDRO's weights `q` over the groups, `[G]`, non-negative and summing to 1."""

    group_weights: jax.Array


def track_group_weights(num_groups: int) -> optax.GradientTransformationExtraArgs:
    """An optax link that stores the step's new group weights and passes the updates unchanged.

    Starts from uniform weights; `update(..., group_weights=q)` replaces them (without the argument
    the state stays as it is).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")

    def init_fn(params: optax.Params) -> GroupWeightsState:
        del params
        return GroupWeightsState(jnp.full([num_groups], 1.0 / num_groups, jnp.float32))

    def update_fn(updates: optax.Updates, state: GroupWeightsState, params: optax.Params | None = None, *,
                  group_weights: jax.Array | None = None, **extra_args: Any) -> tuple[optax.Updates, Any]:
        del params, extra_args
        if group_weights is None:
            return updates, state
        return updates, GroupWeightsState(jnp.asarray(group_weights, jnp.float32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_weights(opt_state: Any) -> jax.Array:
    """The weights `q` held by a `track_group_weights` link somewhere in `opt_state`."""
    found = [s.group_weights for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, GroupWeightsState))
             if isinstance(s, GroupWeightsState)]
    if len(found) != 1:
        raise ValueError(f"the optimiser state holds {len(found)} group-weight states, expected one")
    return found[0]


def update_group_weights(q: jax.Array, group_losses: jax.Array, present: jax.Array, eta: float,
                         adjustment: jax.Array | float = 0.0) -> jax.Array:
    """One exponentiated-gradient step: `q * exp(eta * (L_g + adjustment_g))` on present groups, normalised.

    Computed in log space (a softmax), so large `eta * L` do not overflow.
    """
    exponent = jnp.where(present, eta * (group_losses + adjustment), 0.0)
    return jax.nn.softmax(jnp.log(q) + exponent)


def adjustments(group_counts: np.ndarray, strength: float) -> np.ndarray:
    """The group adjustment `C / sqrt(n_g)` per group (flattened `[K * A]`; 0 for an empty group)."""
    counts = np.asarray(group_counts, dtype=np.float64).ravel()
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, strength / np.sqrt(counts), 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RobustLoss:
    """The objective of the GroupDRO train step (`train_step.objective`).

    Attributes:
      eta: step size of the group weights.
      adjustment: `[G]` the group adjustment added to each group's loss in the weight update.
      group_names: `[G]` names for the logged weights (`group_weight/<name>`).
    """

    eta: float
    adjustment: np.ndarray
    group_names: Sequence[str]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def __call__(self, example_losses: jax.Array, groups: jax.Array, opt_state: Any,
                 device_sum: Callable[[Any], Any] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
        """The robust loss of one batch shard, the optimiser's extra arguments and metrics.

        Args:
          example_losses: `[n]` per-example cross-entropies of this device's shard.
          groups: `[n]` their group ids in `[0, G)`.
          opt_state: the optimiser state holding the current `q`.
          device_sum: sums a pytree over the devices' shards of the global batch (None: one shard).
        """
        one_hot = jax.nn.one_hot(groups, self.num_groups, dtype=example_losses.dtype)
        sums, counts = example_losses @ one_hot, one_hot.sum(axis=0)
        if device_sum is not None:
            sums, counts = device_sum((sums, counts))
        group_losses = sums / jnp.maximum(counts, 1.0)
        present = counts > 0
        q = update_group_weights(group_weights(opt_state), jax.lax.stop_gradient(group_losses), present,
                                 self.eta, jnp.asarray(self.adjustment))
        robust = jnp.dot(jax.lax.stop_gradient(q), group_losses)
        metrics = {"worst_group_loss": jnp.max(jnp.where(present, group_losses, -jnp.inf)),
                   **{f"group_weight/{name}": q[g] for g, name in enumerate(self.group_names)}}
        return robust, {"group_weights": q}, metrics


class GroupDro(method.Method):
    """GroupDRO: one batch with its groups under the robust loss (see the module docstring)."""

    uses_groups = True

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        self.config, self.attribute, self.label = context.config, attribute, train["label"]
        settings = self.config.method.group_dro
        if settings.sampling not in SAMPLING:
            raise ConfigError(f"config method.group_dro.sampling must be one of {SAMPLING}, got {settings.sampling!r}")
        if not (np.isfinite(settings.eta) and settings.eta >= 0):
            raise ConfigError(f"config method.group_dro.eta = {settings.eta} must be a number >= 0")
        if not (np.isfinite(settings.adjustment) and settings.adjustment >= 0):
            raise ConfigError(f"config method.group_dro.adjustment = {settings.adjustment} must be a number >= 0")
        # c = 1: the balanced row; the natural row does not depend on c.
        self.plan = method.batch_plan(self.config, self.label, attribute, c=1.0, beta=0.0)

    def sampler(self, seed: int) -> samplers.StepSampler:
        return samplers.PairedIndexSampler(self.plan, self.label, self.attribute, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (LESS_BIASED,) if self.config.method.group_dro.sampling == "balanced" else (BIASED,)

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        """The common optimiser after the group weights, so that they are saved and restored with the state."""
        num_groups = self.plan.num_classes * self.plan.num_attributes
        return optax.chain(track_group_weights(num_groups), super().optimizer())

    def robust_loss(self) -> RobustLoss:
        """GroupDRO's objective for these training groups."""
        settings = self.config.method.group_dro
        names = [self.plan.group_name(y, a) for y in range(self.plan.num_classes)
                 for a in range(self.plan.num_attributes)]
        return RobustLoss(eta=float(settings.eta), group_names=names,
                          adjustment=adjustments(self.plan.group_counts, settings.adjustment))

    def gradients(self) -> train_step.GradientFn:
        return train_step.objective(self.robust_loss())

    def describe(self) -> str:
        settings = self.config.method.group_dro
        batch = "the less-biased batch (c = 1: group-balanced)" if self.rows == (LESS_BIASED,) else (
            "the biased batch (natural group shares within each class)")
        return (f"{self.plan.describe()}\nGroupDRO trains on {batch} alone ({self.plan.batch_size} examples per "
                f"step), eta = {settings.eta:g}, group adjustment C = {settings.adjustment:g}.")
