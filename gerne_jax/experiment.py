"""What train.py and evaluate.py both build from a config: schedules, model, optimiser, state."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from gerne_jax import models, pretrained, train_step

CLASS_NAMES = ("non_tumour", "tumour")
METHODS = ("gerne", "erm")


def is_paired(config: ml_collections.ConfigDict) -> bool:
    """True for GERNE (paired batches); False for ERM (the biased batch alone)."""
    if config.method.name not in METHODS:
        raise ValueError(f"config method.name must be one of {METHODS}, got {config.method.name!r}")
    return config.method.name == "gerne"


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Constant or cosine decay over `training.steps`, after `optimizer.warmup_steps` of linear warm-up."""
    opt, steps = config.optimizer, config.training.steps
    if opt.schedule == "constant":
        decay = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.learning_rate, max(steps - opt.warmup_steps, 1))
    else:
        raise ValueError(f"config optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")
    if opt.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def beta_schedule(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`method.beta`, or a linear ramp to it from 0 (resampling) over `method.beta_warmup_steps`."""
    if not is_paired(config):
        return -1.0
    if config.method.beta_warmup_steps > 0:
        return optax.linear_schedule(0.0, config.method.beta, config.method.beta_warmup_steps)
    return config.method.beta


def create_model(config: ml_collections.ConfigDict) -> models.ResNet:
    """The configured ResNet; `model.norm = "auto"` is "frozen" with pretrained weights, else "group"."""
    norm = pretrained.resolve_norm(config.model.norm, config.model.init_from)
    return models.create_model(config.model.name, num_classes=len(CLASS_NAMES), norm=norm,
                               dtype=config.model.dtype)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with coupled weight decay, led by `extrapolate(beta)` on the default GERNE path."""
    extrapolates = is_paired(config) and not config.method.fold_beta_into_loss
    return train_step.make_optimizer(
        learning_rate_schedule(config), momentum=config.optimizer.momentum,
        weight_decay=config.optimizer.weight_decay, beta=beta_schedule(config) if extrapolates else None)


def initial_state(config: ml_collections.ConfigDict, model: models.ResNet, patch_shape: tuple[int, ...],
                  mesh: Mesh) -> train_step.TrainState:
    """A fresh train state for patches of `patch_shape` (P, P, C), replicated over `mesh`.

    With `model.init_from`, parameters and BatchNorm statistics come from those pretrained weights
    (the classifier head keeps its fresh initialisation).
    """
    rng = jax.random.key(config.training.seed)
    input_shape = (1, *patch_shape)
    variables = train_step.init_variables(rng, model, input_shape)
    if config.model.init_from:
        variables = pretrained.load_pretrained(config.model.init_from, model, variables,
                                               config.model.channel_mapping or None)
    state = train_step.create_train_state(rng, model, input_shape, create_optimizer(config), variables)
    return train_step.replicate(state, mesh)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (its `config.json`)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} holds no run of train.py")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
