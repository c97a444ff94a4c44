"""A run's text files in its workdir: `config.json` (what it was trained with) and `metrics.jsonl`.

`metrics.jsonl` holds one JSON object per line: `{"step": int, "split": "train" | "validation",
<metric>: float, ...}`, the training metrics of log steps and the validation metrics of evaluations.
This module is the only reader and writer of both files (checkpoints are `gerne_jax.checkpoints`').
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import ml_collections
import numpy as np

from gerne_jax import files
from gerne_jax.config_utils import flatten
from gerne_jax.errors import ConfigError, InputError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Config keys that may change when a run is resumed: its length and intervals, and how its processes are
# launched (the global batches, hence the result, do not depend on the number of processes).
RESUMABLE_CHANGES = ("training.steps", "training.eval_every", "training.checkpoint_every",
                     "training.log_every", "mesh.distributed", "mesh.coordinator_address", "mesh.num_processes",
                     "mesh.process_id")


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist: {workdir} holds no run of train.py")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error})") from None


def check_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigError) a workdir that holds a run with another config.

    Only the run length, the log, evaluation and checkpoint intervals and the process launch settings
    (`RESUMABLE_CHANGES`) may differ from the saved config. A key that a later version added (absent from
    the saved config) is no change while it keeps its default, which by design reproduces the behaviour of
    the version before it (so a run started before the key existed resumes).
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if path.is_file():
        from configs import default  # configs import gerne_jax: here, not at module level

        saved = flatten(json.loads(path.read_text()))
        current = flatten(json.loads(config.to_json()))
        defaults = flatten(json.loads(default.get_config().to_json()))
        changed = sorted(k for k in saved.keys() | current.keys()
                         if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES
                         and not (k not in saved and k in defaults and current[k] == defaults[k]))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ConfigError(f"{workdir} holds a run with another config ({details}); "
                             "use a new --workdir or the saved config")


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Saves the run's config, after refusing a workdir that holds a run with another config (`check_config`)."""
    check_config(workdir, config)
    files.write_text_atomic(pathlib.Path(workdir) / CONFIG_FILE, config.to_json(indent=2))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of the run's metrics.jsonl (empty when there is none)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_finished(workdir: str | os.PathLike) -> bool:
    """True when the run's metrics hold the validation figures of its last step."""
    if not (pathlib.Path(workdir) / CONFIG_FILE).is_file():
        return False
    steps = read_config(workdir).training.steps
    return any(row["split"] == "validation" and row["step"] == steps for row in read_metrics(workdir))


class MetricsLog:
    """Appends rows to metrics.jsonl, first dropping the rows of steps after `start_step`.

    A resumed run redoes the steps after its last checkpoint; their old rows would be duplicates.
    """

    def __init__(self, workdir: str | os.PathLike, start_step: int):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        kept = [row for row in read_metrics(workdir) if row["step"] <= start_step]
        if self.path.exists():
            files.write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file: TextIO = self.path.open("a")

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> dict[str, float]:
        """Writes the scalar `values` as one row; returns them as floats."""
        scalars = {name: float(value) for name, value in values.items() if np.ndim(value) == 0}
        self._file.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        self._file.flush()
        return scalars

    def close(self) -> None:
        self._file.close()


def rows_of(rows: Iterable[Mapping[str, Any]], split: str) -> list[Mapping[str, Any]]:
    """The rows of one split, in step order."""
    return sorted((row for row in rows if row["split"] == split), key=lambda row: row["step"])
