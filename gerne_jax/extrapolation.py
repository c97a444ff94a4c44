"""GERNE's gradient extrapolation as an optax transformation (SPEC 3 and 5)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

BIASED, LESS_BIASED = 0, 1  # positions of the two batches on the stacked leading axis


class ExtrapolateState(NamedTuple):
    """State of `extrapolate`: how many updates have been made (the argument of a beta schedule)."""

    count: jax.Array  # int32 scalar


def extrapolate(beta: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    r"""Extrapolates from the biased past the less-biased gradient.

    `update` receives the two per-batch gradients stacked on a new leading axis of size 2, index 0
    the biased batch's gradient :math:`g_b`, index 1 the less-biased batch's :math:`g_{lb}`, and
    returns gradients of the ordinary (unstacked) parameter shapes:

    .. math::
      g_{ext} = g_{lb} + \beta_t \, (g_{lb} - g_b)
              = \nabla_\theta \left[ (1 + \beta_t) L_{lb} - \beta_t L_b \right],

    with :math:`\beta_t` = `beta` or `beta(t)` for a schedule, `t` the number of earlier updates.
    `beta = -1` gives :math:`g_b` (ERM on the biased batch), `beta = 0` gives :math:`g_{lb}`
    (group resampling when the less-biased batch has c = 1). Because the stacked axis is gone after
    this transformation, it must come first in a chain, e.g.
    `optax.chain(extrapolate(beta), optax.add_decayed_weights(wd), optax.sgd(lr, momentum))`.

    Contract: `init(params)` takes the ordinary parameters; `update(stacked_grads, state, params)`
    takes gradients whose every leaf has shape `(2, *param.shape)`. When `params` is given the
    shapes are checked against it (a clear error instead of a silent broadcast).

    Args:
      beta: the extrapolation factor, a float or an optax schedule (step count -> beta).
        SPEC 3 gives the range [-1, beta_max] (`gerne_jax.groups` computes beta_max).

    Returns:
      An `optax.GradientTransformation`.
    """

    def init_fn(params: optax.Params) -> ExtrapolateState:
        del params
        return ExtrapolateState(count=jnp.zeros([], jnp.int32))

    def update_fn(stacked_grads: optax.Updates, state: ExtrapolateState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, ExtrapolateState]:
        _check_stacked(stacked_grads, params)
        beta_t = beta(state.count) if callable(beta) else beta

        def combine(stacked: jax.Array) -> jax.Array:
            g_b, g_lb = stacked[BIASED], stacked[LESS_BIASED]
            return g_lb + jnp.asarray(beta_t, stacked.dtype) * (g_lb - g_b)

        updates = jax.tree.map(combine, stacked_grads)
        return updates, ExtrapolateState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _check_stacked(stacked_grads: optax.Updates, params: optax.Params | None) -> None:
    """Raises ValueError unless every gradient leaf is a stacked pair (of its parameter's shape)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(stacked_grads)
    param_leaves = [None] * len(paths_and_leaves) if params is None else jax.tree.leaves(params)
    if len(param_leaves) != len(paths_and_leaves):
        raise ValueError(f"extrapolate: the gradients have {len(paths_and_leaves)} leaves but params "
                         f"have {len(param_leaves)}")
    for (path, grad), param in zip(paths_and_leaves, param_leaves):
        expected = None if param is None else (2, *jnp.shape(param))
        if jnp.ndim(grad) < 1 or jnp.shape(grad)[0] != 2 or (expected and jnp.shape(grad) != expected):
            raise ValueError(
                f"extrapolate expects per-batch gradients stacked on a leading axis of size 2 "
                f"(0 = biased, 1 = less-biased); leaf {jax.tree_util.keystr(path)} has shape "
                f"{jnp.shape(grad)}" + (f", expected {expected}" if expected else "") +
                ". A single (unstacked) gradient needs an optimiser without extrapolate.")
