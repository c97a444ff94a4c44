"""The model's inference-mode forward pass on raw patches: the one prediction function of evaluation
(`evaluate.Evaluator`, DFR's features) and of whole-slide prediction (`inference.PatchClassifier`).

`probabilities(model, variables, images, mean, std)` standardises source-dtype patches as training does
(`normalisation.standardise`), applies the model in inference mode and softmaxes, in one jitted program;
`embeddings` returns the penultimate embeddings instead. `BatchPredictor` runs either on fixed-size
batches, zero-padded and sharded over the mesh, so that one compiled program serves every call.
`variables` are Flax's `{"params": ..., "batch_stats": ...}` (`batch_stats` `{}` for GroupNorm models):
a restored checkpoint's (`gerne_jax.runs.run.RestoredModel.variables`) or a training state's.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.data import normalisation
from gerne_jax.models import resnet

# `probabilities` or `embeddings`: (model, variables, images, mean, std) -> [N, ...] float32.
Forward = Callable[[resnet.ResNet, Mapping[str, Any], jax.Array, jax.Array, jax.Array], jax.Array]


def _inference_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    # A GroupNorm model has no batch statistics: Flax's apply takes its parameters alone.
    if variables.get("batch_stats"):
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    return {"params": variables["params"]}


@functools.partial(jax.jit, static_argnames="model")
def probabilities(model: resnet.ResNet, variables: Mapping[str, Any], images: jax.Array, mean: jax.Array,
                  std: jax.Array) -> jax.Array:
    """Inference-mode class probabilities [N, K] (float32) of source-dtype images [N, H, W, C]."""
    logits = model.apply(_inference_variables(variables), normalisation.standardise(images, mean, std), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames="model")
def embeddings(model: resnet.ResNet, variables: Mapping[str, Any], images: jax.Array, mean: jax.Array,
               std: jax.Array) -> jax.Array:
    """Inference-mode penultimate embeddings [N, D] (float32) of source-dtype images [N, H, W, C]."""
    _, captured = model.apply(_inference_variables(variables), normalisation.standardise(images, mean, std),
                              train=False, mutable=[resnet.EMBEDDING])
    return captured[resnet.EMBEDDING][resnet.EMBEDDING][0].astype(jnp.float32)


class BatchPredictor:
    """A model's outputs on global batches of `batch_size` patches sharded over `mesh`.

    Args:
      model: the network (a `resnet.ResNet`).
      standardise: the training data's normalisation, replicated on `mesh`.
      mesh: the devices; each batch is split over them.
      batch_size: the global batch; each process hands in its share (`batch_size / processes` rows), which
        must divide over its devices.
    """

    def __init__(self, model: resnet.ResNet, standardise: normalisation.Standardiser, mesh: Mesh, batch_size: int):
        self.model, self.standardise, self.mesh = model, standardise, mesh
        self.batch_size = batch_size
        # This process's part of a batch: all of it on a mesh of its own devices (prediction across hosts).
        self._share = batch_size * len(mesh.local_devices) // mesh.devices.size

    def __call__(self, variables: Mapping[str, Any], images: np.ndarray,
                 forward: Forward = probabilities) -> jax.Array:
        """Starts `forward` on this process's share of a batch, `images` [n <= share, ...] zero-padded to the
        share; returns the (asynchronous) global `[batch_size, ...]` output, each process's rows in order."""
        if len(images) > self._share:
            raise ValueError(f"{len(images)} patches for a batch share of {self._share}")
        if len(images) < self._share:
            padded = np.zeros((self._share, *images.shape[1:]), images.dtype)
            padded[:len(images)] = images
            images = padded
        placed = sharding.shard_batch({"image": images}, self.mesh, batch_axis=0)["image"]
        return forward(self.model, variables, placed, self.standardise.mean, self.standardise.std)
