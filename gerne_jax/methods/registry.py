"""The training methods by `method.name`: the one place a method's name selects its class.

The built-in methods are registered here (their modules do not import this one); a plug-in adds its own
with `register(name, cls)` before training, and `gerne-jax train` then runs `--config.method.name=NAME`
like a built-in one.
"""
from __future__ import annotations

import importlib
import pathlib
from typing import TYPE_CHECKING

import ml_collections

from gerne_jax.core.errors import ConfigError

if TYPE_CHECKING:
    from gerne_jax.train.method import Method
    from gerne_jax.train.train_state import TrainState

# The built-in methods as "module:class", imported when one is asked for: the names are known without
# loading JAX (`gerne-jax train --help`, the configs' switch check).
_BUILTIN = {
    "gerne": "gerne_jax.methods.gerne:Gerne",
    "erm": "gerne_jax.methods.erm:Erm",
    "group_dro": "gerne_jax.methods.group_dro:GroupDro",
    "jtt": "gerne_jax.methods.jtt:Jtt",
    "ratio_weighted": "gerne_jax.methods.ratio_weighted:RatioWeighted",
    "dfr": "gerne_jax.methods.dfr:Dfr",
}
_registered: dict[str, type[Method]] = {}


def register(name: str, cls: type[Method]) -> None:
    """Makes `method.name = name` train with `cls` (a `gerne_jax.train.method.Method` subclass)."""
    from gerne_jax.train.method import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r}: {cls!r} is not a subclass of gerne_jax.train.method.Method")
    _registered[name] = cls


def names() -> tuple[str, ...]:
    """The registered `method.name` values."""
    return (*_BUILTIN, *(name for name in _registered if name not in _BUILTIN))


def check_name(name: str) -> None:
    """ConfigError naming the choices for a `method.name` that no method has."""
    if name not in names():
        raise ConfigError(f"config method.name = {name!r} is not a training method; choose one of {names()}")


def get(name: str) -> type[Method]:
    """The method class of `method.name = name`; ConfigError naming the choices for an unknown one."""
    check_name(name)
    if name in _registered:
        return _registered[name]
    module, cls = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(config: ml_collections.ConfigDict) -> Method:
    """The configured method (`config.method.name`), refusing pseudo-groups for methods other than GERNE."""
    from gerne_jax.methods import gerne, pseudo_groups

    cls = get(config.method.name)
    if pseudo_groups.enabled(config) and not issubclass(cls, gerne.Gerne):
        raise ConfigError(f"config method.pseudo_groups.scoring_workdir = "
                          f"{config.method.pseudo_groups.scoring_workdir!r} is read by method.name = 'gerne' only "
                          f"(GERNE or resampling on pseudo-groups), not {config.method.name!r}; leave it empty")
    return cls()


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          config_defaults: ml_collections.ConfigDict | None = None) -> TrainState:
    """Trains the configured method in `workdir` (`Method.train`: the shared loop, or the method's own)."""
    return create(config).train(config, workdir, config_defaults)
