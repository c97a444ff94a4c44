"""What the command lines share: logging set-up, the one-line answer to bad input, the exit after SIGTERM."""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import logging as absl_logging

from gerne_jax.errors import InputError, Interrupted

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


def setup_logging() -> None:
    """Our messages at INFO; the libraries' (orbax, TFDS, absl) chatter only from WARNING or ERROR up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns about read-only checkpoint managers


def exit_after_interruption() -> NoReturn:
    """Exits with 143 once a SIGTERM-interrupted run has saved and closed everything.

    Skips interpreter teardown: the tf.data iterator's destructor can wait for a worker thread that
    waits for the GIL, which hung runs after SIGTERM. Call it from a command's `main` only.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(SIGTERM_EXIT_CODE)


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """Runs a command's `main` and exits with its status; an `InputError` becomes one line and status 2.

    `error: <message>` on stderr, no traceback: the message names the file, slide, checkpoint or config key.
    An `Interrupted` job (SIGTERM, state saved) exits with 143 through `exit_after_interruption`.
    Any other exception keeps its traceback (a bug). Noise that libraries print while the interpreter
    shuts down (asyncio's "Event loop is closed" from orbax's background loops) is dropped.
    """
    sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)
    try:
        code = main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except Interrupted as stop:
        print(f"{stop}; run the same command again to resume", file=sys.stderr)
        exit_after_interruption()
    sys.exit(code or 0)


def _quiet_unraisable_hook(default_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        default_hook(unraisable)

    return hook
