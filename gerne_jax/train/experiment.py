"""The model and the train state a config describes, for training, evaluation and prediction alike."""
from __future__ import annotations

import jax
import ml_collections
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.data import dataset
from gerne_jax.methods import training_method
from gerne_jax.models import pretrained, resnet
from gerne_jax.train import train_state


def create_model(config: ml_collections.ConfigDict) -> resnet.ResNet:
    """The configured ResNet; `model.norm = "auto"` is "frozen" with pretrained weights, else "group"."""
    norm = pretrained.resolve_norm(config.model.norm, config.model.init_from)
    return resnet.create_model(config.model.name, num_classes=len(dataset.CLASS_NAMES), norm=norm,
                               dtype=config.model.dtype)


def initial_state(config: ml_collections.ConfigDict, model: resnet.ResNet, patch_shape: tuple[int, ...],
                  mesh: Mesh) -> train_state.TrainState:
    """A fresh train state for patches of `patch_shape` (P, P, C), replicated over `mesh`.

    With `model.init_from`, parameters and BatchNorm statistics come from those pretrained weights
    (the classifier head keeps its fresh initialisation). The optimiser is the methods' one.
    """
    rng = jax.random.key(config.training.seed)
    input_shape = (1, *patch_shape)
    variables = train_state.init_variables(rng, model, input_shape)
    if config.model.init_from:
        variables = pretrained.load_pretrained(config.model.init_from, model, variables,
                                               config.model.channel_mapping or None)
    state = train_state.create_train_state(rng, model, input_shape, training_method.make_optimizer(config), variables)
    return sharding.replicate(state, mesh)


def abstract_state(config: ml_collections.ConfigDict, model: resnet.ResNet, patch_shape: tuple[int, ...],
                   mesh: Mesh) -> train_state.TrainState:
    """The shapes, dtypes and (replicated) shardings of `initial_state`, without computing it.

    A restore target for checkpoints: tracing the initialisation is enough, so nothing is compiled or run.
    """
    rng = jax.random.key(config.training.seed)
    input_shape = (1, *patch_shape)
    state = jax.eval_shape(lambda: train_state.create_train_state(
        rng, model, input_shape, training_method.make_optimizer(config),
        train_state.init_variables(rng, model, input_shape)))
    replicated = sharding.replicated_sharding(mesh)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), state)
