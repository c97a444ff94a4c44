"""The `gerne-jax` console tool: `gerne-jax COMMAND [ARGS...]`, one command per entry point.

The commands are the entry points of the group `gerne_jax.commands` (pyproject.toml): the tiling
application registers `synthetic`, `tile` and `stats`, this package `train`, `evaluate` and `predict`.
An installed package of one's own can add a command the same way, without touching this one.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import NoReturn

from gerne_jax.core import cli
from gerne_jax.core.errors import InputError

ENTRY_POINT_GROUP = "gerne_jax.commands"
PROG = "gerne-jax"


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `gerne-jax` script; `python -m gerne_jax` is the same."""
    argv = sys.argv[1:] if argv is None else argv
    cli.run_command(lambda: cli.dispatch(PROG, _commands(), argv))


def _commands() -> dict[str, cli.LoadCommand]:
    entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    if not entry_points:
        raise InputError(f"no {PROG} commands are registered: install the package (`pip install .`, "
                         "or `make install` in a checkout) so that its entry points exist")
    return {entry_point.name: entry_point.load for entry_point in entry_points}
