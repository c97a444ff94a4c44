"""A run's text files in its workdir: `config.json` (what it was trained with), `data_spec.json` (what
its model takes as input) and `metrics.jsonl`.

`metrics.jsonl` holds one JSON object per line: `{"step": int, "split": "train" | "validation",
<metric>: float, ...}`, the training metrics of log steps and the validation metrics of evaluations.

`data_spec.json` (`DataSpec`) holds what prediction and evaluation need of the training DATA_DIR, so
that a workdir copied without its data still predicts: `{"version": 1, "data_dir": str, "metadata":
{...}, "tiling": {...} | null, "slide_splits": {slide_id: split}}`, code names throughout. `metadata`
is the DATA_DIR's metadata.json (patch size, channel names in order, source dtype, level and level
downsample, stride, min tumour pixels, min tissue ratio, channel mean and std); `tiling` and
`slide_splits` come from its tiling_report.json (the tiler's settings; which slide went into which
split), null and {} for a DATA_DIR without one. `data_dir` records where it was taken from.

This module is the only reader and writer of these files (checkpoints are `gerne_jax.runs.checkpoints`').
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import ml_collections
import numpy as np

from gerne_jax.core import files
from gerne_jax.core.config_utils import flatten
from gerne_jax.core.errors import ConfigError, InputError
from gerne_jax.data import dataset
from gerne_jax.slides import tiling_report

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
DATA_SPEC_FILE = "data_spec.json"
DATA_SPEC_VERSION = 1
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


def check_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 defaults: ml_collections.ConfigDict | None = None) -> None:
    """Refuses (ConfigError) a workdir that holds a run with another config.

    Only the run length, the log, evaluation and checkpoint intervals and the process launch settings
    (`RESUMABLE_CHANGES`) may differ from the saved config. A key that a later version added (absent from
    the saved config) is no change while it keeps its value in `defaults`, the current version's default
    config (`configs/default.py`'s, which the train command loads): by design a key's default reproduces
    the behaviour of the version before it, so a run started before the key existed resumes. Without
    `defaults`, every added key is a change.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if path.is_file():
        saved = flatten(json.loads(path.read_text()))
        current = flatten(json.loads(config.to_json()))
        default_values = flatten(json.loads(defaults.to_json())) if defaults is not None else {}
        changed = sorted(k for k in saved.keys() | current.keys()
                         if saved.get(k) != current.get(k) and k not in RESUMABLE_CHANGES
                         and not (k not in saved and k in default_values and current[k] == default_values[k]))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ConfigError(f"{workdir} holds a run with another config ({details}); "
                             "use a new --workdir or the saved config")


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 defaults: ml_collections.ConfigDict | None = None) -> None:
    """Saves the run's config, after refusing a workdir that holds a run with another config
    (`check_config` with `defaults`)."""
    check_config(workdir, config, defaults)
    files.write_text_atomic(pathlib.Path(workdir) / CONFIG_FILE, config.to_json(indent=2))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a run's model takes as input and how its data was tiled (module docstring), in code names.

    `source` is where the values were read (the run's data_spec.json, or a DATA_DIR for a run trained
    before runs stored their spec); messages name it, the file does not hold it.
    """

    data_dir: str                      # the DATA_DIR it was taken from (absolute), a record only
    metadata: dict[str, Any]           # dataset.read_metadata of that DATA_DIR
    tiling: dict[str, Any] | None      # its tiling report's "config"; None without a report
    slide_splits: dict[str, str]       # slide id -> split, from its tiling report ({} without one)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """The file's content: JSON types only (what `read_data_spec` reads back equal)."""
        return json.loads(json.dumps({"version": DATA_SPEC_VERSION, "data_dir": self.data_dir,
                                      "metadata": self.metadata, "tiling": self.tiling,
                                      "slide_splits": self.slide_splits}))


def data_spec_of(data_dir: str | os.PathLike) -> DataSpec:
    """The data spec of a DATA_DIR as it is now: its metadata (`dataset.read_metadata`) and tiling report
    (`tiling_report.read`)."""
    metadata = dataset.read_metadata(data_dir)  # first: it names a folder that is no dataset
    report = tiling_report.read(data_dir)
    slides = report["slides"] if report is not None else {}
    return DataSpec(data_dir=str(pathlib.Path(data_dir).absolute()), metadata=metadata,
                    tiling=report["config"] if report is not None else None,
                    # A failed slide keeps its split in the report: `predict --split` has always counted it.
                    slide_splits={slide_id: entry["split"] for slide_id, entry in slides.items()
                                  if entry.get("split")},
                    source=str(data_dir))


def read_data_spec(workdir: str | os.PathLike) -> DataSpec | None:
    """The data spec the run in `workdir` stored when it started; None for a run trained before runs
    stored one (its callers then read the run's DATA_DIR, `data_spec_of`, as such runs always did)."""
    path = pathlib.Path(workdir) / DATA_SPEC_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        version = int(stored["version"])
        spec = DataSpec(data_dir=str(stored["data_dir"]), metadata=dict(stored["metadata"]),
                        tiling=dict(stored["tiling"]) if stored["tiling"] is not None else None,
                        slide_splits=dict(stored["slide_splits"]), source=str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} is not a run's data spec ({type(error).__name__}: {error})") from None
    if version > DATA_SPEC_VERSION:
        raise InputError(f"{path} has version {version}; this gerne-jax reads up to version {DATA_SPEC_VERSION} "
                         "(upgrade gerne-jax)")
    return spec


def check_data_spec(workdir: str | os.PathLike, spec: DataSpec) -> None:
    """Refuses (InputError) a workdir whose stored data spec differs from `spec`, the DATA_DIR as it is now:
    a resumed run must go on with the data it started on, and its spec must stay the one its model fits.

    `data_dir` is not compared: the content defines the model's input, not the folder's name.
    """
    stored = read_data_spec(workdir)
    if stored is None:
        return
    saved, current = stored.to_json(), spec.to_json()
    changed = [f"metadata.{key}" for key in sorted(saved["metadata"].keys() | current["metadata"].keys())
               if saved["metadata"].get(key) != current["metadata"].get(key)]
    changed += [key for key in ("tiling", "slide_splits") if saved[key] != current[key]]
    if changed:
        raise InputError(f"{stored.source} records other data than {spec.source} holds now ({', '.join(changed)} "
                         "differ); a run resumes only on the data it started on: restore that data or use a "
                         "new --workdir")


def write_data_spec(workdir: str | os.PathLike, spec: DataSpec) -> None:
    """Stores the run's data spec once, when the run starts: a resumed run's stored spec is checked
    (`check_data_spec`) and kept as it is."""
    check_data_spec(workdir, spec)
    path = pathlib.Path(workdir) / DATA_SPEC_FILE
    if not path.is_file():
        files.write_text_atomic(path, json.dumps(spec.to_json(), indent=2))


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
