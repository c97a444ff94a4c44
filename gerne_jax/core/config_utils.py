"""Config helpers: the declared switches of `get_config(arg)`, checked overrides, flat views."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from gerne_jax.core.errors import ConfigError


def parse_arg(arg: str | None, **switches: Any) -> ml_collections.ConfigDict:
    """Parses `get_config`'s `arg`: `key=value` pairs for the declared `switches` (their defaults).

    A bare first word sets the first switch (`"erm"` is `"method=erm"`). Values take the type of the
    default. Any other change goes through ml_collections' `--config.a.b=value`.
    """
    values = dict(switches)
    names = list(switches)
    for position, item in enumerate(filter(None, (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep and position == 0 and names:
            key, value = names[0], item
        elif not sep:
            raise ConfigError(f"config argument {item!r} is not of the form key=value; switches: {names}")
        key = key.strip()
        if key not in switches:
            raise ConfigError(f"unknown config switch {key!r}{did_you_mean(key, names)}; switches: {names}. "
                              "Change other keys with --config.<key>=<value>")
        values[key] = type(switches[key])(value.strip()) if switches[key] is not None else value.strip()
    return ml_collections.ConfigDict(values)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping (or ConfigDict) -> {"a.b.c": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key `overrides` applied; unknown keys name the closest valid one."""
    config = ml_collections.ConfigDict(config.to_dict())
    valid = sorted(flatten(config.to_dict()))
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
        *parents, leaf = key.split(".")
        section = config
        for part in parents:
            section = section[part]
        current = section[leaf]
        section[leaf] = tuple(value) if isinstance(current, tuple) else value
    config.lock()
    return config


def did_you_mean(key: str, valid: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest valid key, or an empty string."""
    match = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
