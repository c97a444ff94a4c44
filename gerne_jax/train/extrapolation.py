"""GERNE's gradient extrapolation as an optax transformation, and the optimiser built around it.

The method is described in docs/design.md §3.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gerne_jax.core.errors import ConfigError


def extrapolate(beta: float | jnp.ndarray) -> optax.GradientTransformationExtraArgs:
    r"""Extrapolates from the biased past the less-biased gradient.

    `update(updates, state, params, biased_updates=g_b)` takes the less-biased batch's gradient
    :math:`g_{lb}` as `updates` and the biased batch's :math:`g_b` as the extra argument, and returns
    updates shaped like its input:

    .. math::
      g_{ext} = g_{lb} + \beta \, (g_{lb} - g_b)
              = \nabla_\theta \left[ (1 + \beta) L_{lb} - \beta L_b \right].

    `beta = -1` gives :math:`g_b` (ERM on the biased batch), `beta = 0` gives :math:`g_{lb}` (group
    resampling when the less-biased batch has c = 1). Without `biased_updates` the updates pass
    unchanged: a gradient that is already extrapolated (the folded path) or a single batch's (ERM).
    Stateless; for a schedule of beta wrap the optimiser in `optax.inject_hyperparams`, as
    `gerne_sgd` does.

    Because the biased gradient arrives as an extra argument, transformations that see only `updates`
    must come after this one: `optax.clip_by_global_norm` clips the extrapolated gradient, and
    `optax.MultiSteps` accumulates it when it wraps the links after `extrapolate` (wrapped around
    `extrapolate` itself it would pair the mean of the less-biased gradients with the last biased one).

    Args:
      beta: the extrapolation factor, in `[-1, beta_max]` (`gerne_jax.data.groups.beta_max`).
    """

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None,
                  *, biased_updates: optax.Updates | None = None,
                  **extra_args: Any) -> tuple[optax.Updates, optax.EmptyState]:
        del params, extra_args
        if biased_updates is None:
            return updates, state
        _check_same_shapes(updates, biased_updates)
        difference = optax.tree.sub(updates, biased_updates)
        return optax.tree.add_scale(updates, beta, difference), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_same_shapes(updates: optax.Updates, biased_updates: optax.Updates) -> None:
    """A clear error instead of a silent broadcast when the two gradients do not match leaf for leaf."""
    shapes = jax.tree.map(jnp.shape, updates)
    biased_shapes = jax.tree.map(jnp.shape, biased_updates)
    if jax.tree.structure(updates) != jax.tree.structure(biased_updates) or shapes != biased_shapes:
        raise ValueError("extrapolate: biased_updates must be shaped like updates (one gradient per "
                         f"parameter); got {biased_shapes} for updates {shapes}")


def gerne_sgd(learning_rate: float | jnp.ndarray, beta: float | jnp.ndarray, momentum: float = 0.9,
              weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """`extrapolate(beta)`, coupled weight decay, SGD with momentum: the official GERNE optimiser.

    Build it with `optax.inject_hyperparams(gerne_sgd)(learning_rate=..., beta=..., ...)` so that
    schedules of both are evaluated at the update count and read back from `state.hyperparams`.
    """
    links = [extrapolate(beta)]
    if weight_decay:
        links.append(optax.add_decayed_weights(weight_decay))
    links.append(optax.sgd(learning_rate, momentum=momentum or None))
    return optax.chain(*links)


def make_optimizer(learning_rate: optax.ScalarOrSchedule, beta: optax.ScalarOrSchedule, *,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """`gerne_sgd` with `learning_rate` and `beta` (floats or schedules) injected as hyperparameters.

    Every training method uses this one optimiser: the two-gradient GERNE step passes `biased_updates`,
    the folded step and single-batch methods pass one gradient.
    """
    return optax.inject_hyperparams(gerne_sgd, static_args=("momentum", "weight_decay"))(
        learning_rate=learning_rate, beta=beta, momentum=momentum, weight_decay=weight_decay)


def learning_rate_schedule(optimizer_config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Constant or cosine decay over `steps`, after `warmup_steps` of linear warm-up (`config.optimizer`)."""
    opt = optimizer_config
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


def beta_schedule(method_config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`beta`, or a linear ramp to it from 0 (resampling) over `beta_warmup_steps` (`config.method`)."""
    if method_config.beta_warmup_steps > 0:
        return optax.linear_schedule(0.0, method_config.beta, method_config.beta_warmup_steps)
    return method_config.beta


def optimizer_from_config(optimizer_config: ml_collections.ConfigDict, steps: int,
                          beta: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """`make_optimizer` per `config.optimizer` for a run of `steps` steps, with this beta (schedule)."""
    return make_optimizer(learning_rate_schedule(optimizer_config, steps), beta,
                          momentum=optimizer_config.momentum, weight_decay=optimizer_config.weight_decay)


def hyperparameters(opt_state: Any) -> dict[str, jnp.ndarray]:
    """The `learning_rate` and `beta` the last update used, read from a `make_optimizer` state (or from
    a chain that holds one, e.g. GroupDRO's group weights before it)."""
    if not hasattr(opt_state, "hyperparams"):
        (opt_state,) = [state for state in opt_state if hasattr(state, "hyperparams")]
    return {name: opt_state.hyperparams[name] for name in ("learning_rate", "beta")}
