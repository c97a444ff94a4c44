"""Precise BatchNorm statistics: population statistics recomputed with the current parameters.

A train-mode BatchNorm network is trained on batches normalised by their own statistics but evaluated
with running averages (an EMA of past batches' statistics, taken under older parameters). With GERNE's
shared normalisation the training batches are also a pair (biased + less-biased) whose mix of groups is
unlike the natural distribution, so the running averages match neither the current parameters nor the
data evaluated: validation accuracy swings from one evaluation to the next. "Precise BN" (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm") replaces them, before each evaluation and save, by the
statistics of K natural-distribution training batches under the current parameters.

For every BatchNorm layer, the forward pass runs in train mode (each layer normalised by the batch's
own statistics, as in training, so later layers see the inputs they were trained on) and the layer's
input mean and (biased) variance per channel are recorded; the population statistics are the mean over
the K batches of the per-batch means and the mean of the per-batch variances (not an EMA). Models
without train-mode BatchNorm ("frozen", "group") are left untouched.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.data import normalisation
from gerne_jax.models.resnet import TRAIN_MODE_BATCH_NORM, ResNet
from gerne_jax.train.train_state import TrainState


def applies_to(model: ResNet) -> bool:
    """Whether `model` has train-mode BatchNorm statistics to recompute."""
    return model.norm in TRAIN_MODE_BATCH_NORM


def batch_moments(model: ResNet, variables: Mapping[str, Any], images: jax.Array) -> dict[str, Any]:
    """Per-channel mean and biased variance of every BatchNorm layer's input on one train-mode batch.

    Returns a tree shaped like `variables["batch_stats"]` (`{"bn1": {"mean", "var"}, ...}`), float32.
    Traceable (jit it); the batch may be sharded over devices: the means are over the global batch.
    """
    moments: dict[tuple[str, ...], jax.Array] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            x = jnp.asarray(args[0], jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            path = tuple(context.module.scope.path)
            moments[(*path, "mean")] = mean
            # Two-pass variance: E[(x - mean)^2] stays accurate where E[x^2] - mean^2 cancels.
            moments[(*path, "var")] = jnp.mean(jnp.square(x - mean), axis=axes)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(dict(variables), images, train=True, mutable=["batch_stats"])
    return traverse_util.unflatten_dict(moments)


# Compiled once per model (a hashable Flax module) and batch shape, not at every recomputation.
_jitted_moments = jax.jit(batch_moments, static_argnums=0)


def population_statistics(state: TrainState, model: ResNet, batches: Iterable[Mapping[str, np.ndarray]],
                          mesh: Mesh, standardise: normalisation.Standardiser) -> dict[str, Any]:
    """The mean over `batches` of `batch_moments` under `state`'s parameters: the new `batch_stats`.

    Args:
      state: the train state (its `batch_stats` give the tree's structure; their values are not used).
      model: the model the state was created with (a train-mode BatchNorm norm, see `applies_to`).
      batches: this process's share of each global batch, `{"image": [n, H, W, C]}` in source units
        (`input_pipeline.natural_batches`).
      mesh: the devices; each batch is sharded over them.
      standardise: the data's normalisation, applied on the devices.
    """
    if not applies_to(model):
        raise ValueError(f"model norm {model.norm!r} has no train-mode BatchNorm statistics to recompute")
    total, count = None, 0
    for batch in batches:
        images = standardise(sharding.shard_batch({"image": batch["image"]}, mesh, batch_axis=0)["image"])
        moments = _jitted_moments(model, {"params": state.params, "batch_stats": state.batch_stats}, images)
        total = moments if total is None else jax.tree.map(jnp.add, total, moments)
        count += 1
    if count == 0:
        raise ValueError("population_statistics needs at least one batch")
    stats = jax.tree.map(lambda s: s / count, total)
    if jax.tree.structure(stats) != jax.tree.structure(state.batch_stats):
        raise ValueError(f"recorded statistics {jax.tree.structure(stats)} do not match the state's "
                         f"batch_stats {jax.tree.structure(state.batch_stats)}")
    return jax.tree.map(lambda new, old: new.astype(old.dtype), stats, state.batch_stats)


def recompute(state: TrainState, model: ResNet, batches: Iterable[Mapping[str, np.ndarray]],
              mesh: Mesh, standardise: normalisation.Standardiser) -> TrainState:
    """`state` with precise BatchNorm statistics (`population_statistics`), replicated over `mesh`."""
    stats = population_statistics(state, model, batches, mesh, standardise)
    return state.replace(batch_stats=sharding.replicate(stats, mesh))
