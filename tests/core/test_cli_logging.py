"""`cli.setup_logging` drops asyncio's late report of an orbax read task that failed after a reported restore."""
from __future__ import annotations

import logging
import os
import sys

from gerne_jax.core import cli


def _exc_info_raised_in(filename: str) -> tuple:
    namespace: dict = {}
    exec(compile("def read():\n    raise ValueError('OUT_OF_RANGE: byte range')\n", filename, "exec"), namespace)
    try:
        namespace["read"]()
    except ValueError:
        return sys.exc_info()


def _asyncio_record(exc_info: tuple) -> logging.LogRecord:
    return logging.getLogger("asyncio").makeRecord(
        "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved\nfuture: %s", ("<Task>",), exc_info)


def test_unretrieved_orbax_read_error_is_dropped_others_are_kept():
    cli.setup_logging()
    orbax_file = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "serialization.py")
    assert not logging.getLogger("asyncio").filter(_asyncio_record(_exc_info_raised_in(orbax_file)))
    # The same report from any other library, and other asyncio errors, still reach the log.
    assert logging.getLogger("asyncio").filter(_asyncio_record(_exc_info_raised_in("/venv/site-packages/mylib/io.py")))
    other = logging.getLogger("asyncio").makeRecord("asyncio", logging.ERROR, __file__, 1, "Unclosed client session",
                                                    (), None)
    assert logging.getLogger("asyncio").filter(other)
