"""The model a config's `model` part describes, for training, evaluation and prediction alike."""
from __future__ import annotations

import ml_collections

from gerne_jax.data import dataset
from gerne_jax.models import pretrained, resnet


def create_model(model_config: ml_collections.ConfigDict) -> resnet.ResNet:
    """The configured ResNet (`config.model`); `norm = "auto"` is "frozen" with pretrained weights, else "group"."""
    norm = pretrained.resolve_norm(model_config.norm, model_config.init_from)
    return resnet.create_model(model_config.name, num_classes=len(dataset.CLASS_NAMES), norm=norm,
                               dtype=model_config.dtype)
