"""The train state: parameters, BatchNorm running statistics and the optimiser state."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

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
