"""The errors a user can fix: bad input, named in the message, answered by the commands with one line.

Every command line (`gerne-jax synthetic|tile|stats|train|evaluate|predict`, the experiments) prints an
`InputError` as `error: <what>, <where>` and exits with status 2 (`gerne_jax.core.cli.run_command`); any other
exception is a bug and keeps its traceback. Subclasses say which kind of input is at fault.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input: a file, slide, dataset, checkpoint or config value; the message names it."""


class ConfigError(InputError):
    """A config key or value; the message names the key and the allowed values or range."""


def cause_chain(error: BaseException) -> list[BaseException]:
    """`error`, then what caused it, and so on (explicit `__cause__` first, else `__context__`)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


class Interrupted(Exception):
    """A job stopped by SIGTERM after saving its state; the same command resumes it (exit status 143)."""
