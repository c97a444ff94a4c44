"""What the command lines share: logging set-up and the exit after a SIGTERM-interrupted run."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

from absl import logging as absl_logging

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
