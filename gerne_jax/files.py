"""Result files (text, PNG figures) written whole or not at all: to a temporary sibling name, then renamed into place.

The temporary name holds the process id, so processes that write the same result at the same time
(two `experiments/grid.py` sharing a root, tiling workers) never rename each other's partial file.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import Any


def temporary_path(path: str | os.PathLike) -> pathlib.Path:
    """A sibling of `path` unique to this process: `NAME.tmp-PID`."""
    path = pathlib.Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path to write; renames it onto `path` on success, removes it on error."""
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text)


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Writes a matplotlib figure as PNG to `path` (whole or not at all) and closes it."""
    import matplotlib.pyplot as plt  # here, so that modules writing no figure need no matplotlib

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)
