"""The train state: parameters, BatchNorm running statistics and the optimiser state."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.models import pretrained
from gerne_jax.models.resnet import ResNet


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics (`{}` for GroupNorm models).

    `apply_gradients` forwards extra arguments to the optimiser (`biased_updates` for GERNE's
    `extrapolate`), which Flax's version does not.
    """

    batch_stats: Any

    def apply_gradients(self, *, grads: Any, optimizer_args: Mapping[str, Any] | None = None,
                        **kwargs: Any) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **(optimizer_args or {}))
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)


def init_variables(rng: jax.Array, model: ResNet, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """`model.init` for image batches of `input_shape` `(N, H, W, C)` (only C matters): params, stats."""
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C), got {tuple(input_shape)}")
    init = jax.jit(lambda key: model.init(key, jnp.zeros(input_shape, jnp.float32), train=False))
    return init(rng)


def create_train_state(rng: jax.Array, model: ResNet, input_shape: tuple[int, ...],
                       tx: optax.GradientTransformation,
                       variables: Mapping[str, Any] | None = None) -> TrainState:
    """Initialises parameters (float32), BatchNorm statistics and the optimiser state.

    Args:
      rng: PRNG key for the parameter initialisers.
      model: a `gerne_jax.models.resnet.ResNet`.
      input_shape: shape of one image batch `(N, H, W, C)`; only C matters for the parameters.
      tx: the optimiser (`extrapolation.make_optimizer`); `tx.init` gets the plain parameters.
      variables: start from these `{"params", "batch_stats"}` (e.g. pretrained weights) instead of
        a fresh `init_variables(rng, model, input_shape)`.
    """
    if variables is None:
        variables = init_variables(rng, model, input_shape)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)


def initial_state(model_config: ml_collections.ConfigDict, model: ResNet, tx: optax.GradientTransformation,
                  patch_shape: tuple[int, ...], mesh: Mesh, seed: int) -> TrainState:
    """A fresh train state for patches of `patch_shape` (P, P, C) with optimiser `tx`, replicated over `mesh`.

    With `model_config.init_from` (`config.model`), parameters and BatchNorm statistics come from those
    pretrained weights (the classifier head keeps its fresh initialisation).
    """
    rng = jax.random.key(seed)
    input_shape = (1, *patch_shape)
    variables = init_variables(rng, model, input_shape)
    if model_config.init_from:
        variables = pretrained.load_pretrained(model_config.init_from, model, variables,
                                               model_config.channel_mapping or None)
    return sharding.replicate(create_train_state(rng, model, input_shape, tx, variables), mesh)


def abstract_state(model: ResNet, tx: optax.GradientTransformation, patch_shape: tuple[int, ...], mesh: Mesh,
                   seed: int) -> TrainState:
    """The shapes, dtypes and (replicated) shardings of `initial_state`, without computing it.

    A restore target for checkpoints (a resumed run's): tracing the initialisation is enough, so nothing
    is compiled or run.
    """
    rng = jax.random.key(seed)
    input_shape = (1, *patch_shape)
    state = jax.eval_shape(lambda: create_train_state(rng, model, input_shape, tx,
                                                      init_variables(rng, model, input_shape)))
    replicated = sharding.replicated_sharding(mesh)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), state)
