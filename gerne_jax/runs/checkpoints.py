"""Orbax checkpoints of one run: the latest (for resuming) and the best by each selection metric.

Layout under `WORKDIR/checkpoints/`:
- `latest/<step>/`: the most recent `keep_latest` states, for resuming;
- `best_wga/<step>/`, `best_bca/<step>/`, ...: the single state with the best validation value of
  that metric so far (ties keep the earlier step).
Each checkpoint holds the train state and a JSON `meta` item: the step, the config and the
validation metrics it was chosen on. A resumed run restores the whole state (`restore`), evaluation
and prediction only the model's variables (`restore_model`). In a one-process run saving is
asynchronous: `save_latest` / `update_best` return once the state is copied off the devices (the next
step may then reuse its donated buffers) and orbax writes it in the background; `wait_until_saved`
blocks until every save has finished, and the trainer calls it before it writes a log row, so a logged
step implies that the checkpoints before it are on disk. A run of several processes saves
synchronously (orbax's background commits of several checkpoint managers wait at cross-process
barriers, which deadlocked in the two-process test). Either way orbax writes every checkpoint to a
temporary folder that it renames when complete, so a killed run never leaves a half-written one.
A checkpoint damaged afterwards (disk, copying) is named with the file that cannot be read; a resumed
run falls back from a damaged latest checkpoint to the previous one (`restore_for_resume`).
"""
from __future__ import annotations

import gc
import json
import logging
import pathlib
import re
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from gerne_jax.core.errors import InputError, cause_chain

# Checkpoint names `evaluate.py --checkpoint` accepts, and the validation metric each one tracks.
BEST_CHECKPOINTS = {
    "best_wga": "worst_group_accuracy",
    "best_bca": "balanced_class_accuracy",
    "best_worst_class": "worst_class_accuracy",
}
LATEST = "latest"

log = logging.getLogger(__name__)


class CheckpointError(InputError):
    """A checkpoint that is missing or cannot be read; the message names the folder."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint with a file that cannot be read (not a mismatch with the config); the message names it."""


def _saves_in_background() -> bool:
    """Whether checkpoints are written on orbax's background thread: in a one-process run (module docstring)."""
    return jax.process_count() == 1


def _manager(directory: pathlib.Path, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only and _saves_in_background())
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class RunCheckpoints:
    """The checkpoints of the run in `workdir` (see the module docstring)."""

    def __init__(self, workdir: str | pathlib.Path, keep_latest: int = 2, read_only: bool = False):
        self.root = pathlib.Path(workdir).absolute() / "checkpoints"
        if read_only and not self.root.is_dir():
            raise CheckpointError(f"{self.root} does not exist: no run was trained in {workdir}")
        self._managers = {LATEST: _manager(self.root / LATEST, keep_latest, read_only)}
        for name in BEST_CHECKPOINTS:
            self._managers[name] = _manager(self.root / name, 1, read_only)
        # Only a run that saves compares with the best values; evaluation needs no best checkpoint's meta.
        self._best_values = {} if read_only else {name: self._restored_best_value(name) for name in BEST_CHECKPOINTS}

    def latest_step(self, name: str = LATEST) -> int | None:
        return self._manager_named(name).latest_step()

    def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._save(LATEST, step, state, meta)

    def update_best(self, step: int, state: Any, meta: dict[str, Any]) -> list[str]:
        """Saves `state` as each best checkpoint whose metric `meta["metrics"]` improves; returns their names."""
        improved = []
        for name, metric in BEST_CHECKPOINTS.items():
            value = meta["metrics"].get(metric)
            best = self._best_values[name]
            if value is None or value != value:  # NaN: metric undefined for this validation split
                continue
            if best is None or value > best:
                self._save(name, step, state, meta)
                self._best_values[name] = value
                improved.append(name)
        return improved

    def restore(self, name_or_step: str | int, target_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state (shaped and sharded like `target_state`) and meta of a named checkpoint or step."""
        name, step = self._located(name_or_step)
        restored = self._restore_items(name, step, state=ocp.args.StandardRestore(target_state),
                                       meta=ocp.args.JsonRestore())
        return restored["state"], restored["meta"]

    def restore_model(self, name_or_step: str | int, target_variables: Mapping[str, Any],
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model variables `{"params", "batch_stats"}` of a named checkpoint or step, shaped and sharded
        like `target_variables`, and its meta.

        Only those two subtrees of the saved state are read (orbax's partial restore): the optimiser
        state, whose shape depends on the training method, is neither needed nor read.
        """
        name, step = self._located(name_or_step)
        target = dict(target_variables)
        restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        restored = self._restore_items(name, step, state=restore, meta=ocp.args.JsonRestore())
        return restored["state"], restored["meta"]

    def _located(self, name_or_step: str | int) -> tuple[str, int]:
        """The manager name and step of a named checkpoint or step; CheckpointError listing what the run
        has when it does not exist."""
        if isinstance(name_or_step, int) or str(name_or_step).isdigit():
            name, step = LATEST, int(name_or_step)
            missing = f"no checkpoint of step {step} in {self.root / LATEST}"
        else:
            name, step = str(name_or_step), self.latest_step(str(name_or_step))
            missing = f"no checkpoint in {self.root / name}"
        if not self.has(name_or_step):
            raise CheckpointError(f"{missing}; the run has: {self.describe_available()}")
        return name, step

    def has(self, name_or_step: str | int) -> bool:
        """Whether a named checkpoint (best_wga, ..., latest) or a step of `latest` exists."""
        if isinstance(name_or_step, int) or str(name_or_step).isdigit():
            return int(name_or_step) in self._managers[LATEST].all_steps()
        return self.latest_step(str(name_or_step)) is not None

    def describe_available(self) -> str:
        """The checkpoints this run has, e.g. "best_wga (step 300), latest (steps 400, 500)", or "none"."""
        found = []
        for name, manager in self._managers.items():
            steps = sorted(manager.all_steps())
            if steps:
                found.append(f"{name} (step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})")
        return ", ".join(found) or "none"

    def restore_for_resume(self, target_state: Any) -> tuple[int, Any] | None:
        """The newest latest checkpoint that can be restored, as (step, state); None when there is none.

        A newer one that cannot be restored (damaged files) is named in one warning line and deleted, so
        that the resumed run saves its step again and ends as an uninterrupted run would. When none can be
        restored, raises CheckpointError naming each.
        """
        steps = sorted(self._managers[LATEST].all_steps(), reverse=True)
        failures: list[tuple[int, CheckpointError]] = []
        for step in steps:
            try:
                state, _ = self.restore(step, target_state)
            except CheckpointError as error:
                failures.append((step, error))
                continue
            if failures:
                log.warning("%s; resuming from step %d (%s) instead, deleting step(s) %s",
                            "; ".join(str(error) for _, error in failures), step, self.root / LATEST / str(step),
                            ", ".join(str(failed) for failed, _ in failures))
                for failed, _ in failures:
                    self._managers[LATEST].delete(failed)
            return step, state
        if failures:
            raise CheckpointError("no checkpoint to resume from can be restored: "
                                  + "; ".join(str(error) for _, error in failures))
        return None

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()

    def _manager_named(self, name: str) -> ocp.CheckpointManager:
        if name not in self._managers:
            raise CheckpointError(f"unknown checkpoint {name!r}; choose one of {sorted(self._managers)} "
                                  "or a step number")
        return self._managers[name]

    def _save(self, name: str, step: int, state: Any, meta: dict[str, Any]) -> None:
        manager = self._managers[name]
        if manager.latest_step() == step:  # re-saving the same step (e.g. after a resume) is a no-op
            return
        manager.wait_until_finished()  # one save in flight per manager
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

    def wait_until_saved(self) -> None:
        """Blocks until every checkpoint save started so far is complete on disk."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def _restored_best_value(self, name: str) -> float | None:
        manager = self._managers[name]
        step = manager.latest_step()
        if step is None:
            return None
        meta = self._restore_items(name, step, meta=ocp.args.JsonRestore())["meta"]
        return meta["metrics"].get(BEST_CHECKPOINTS[name])

    def _restore_items(self, name: str, step: int, **items: Any) -> Any:
        """Orbax's restore; a failure becomes one CheckpointError naming the folder and the file.

        The failed restore's pending read coroutines are collected here, quietly: each would otherwise
        print "Exception ignored in: <coroutine ...>" with a TensorStore spec when it is freed later.
        """
        folder = self.root / name / str(step)
        previous_hook = sys.unraisablehook
        sys.unraisablehook = _without_coroutine_noise(previous_hook)
        try:
            try:
                return self._managers[name].restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # orbax raises many types for damaged or mismatched files
                damage = unreadable_file(folder, error)
                kind = CheckpointError if damage is None else DamagedCheckpointError
                message = f"cannot restore {folder}: {damage or _first_line(error)}"
            gc.collect()  # the error, its frames and their coroutines are unreferenced from here
        finally:
            sys.unraisablehook = previous_hook
        raise kind(message)


def _without_coroutine_noise(default_hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.object, types.CoroutineType):
            default_hook(unraisable)

    return hook


def _first_line(error: BaseException) -> str:
    """The first line of the innermost cause, at most 200 characters (orbax's can be thousands)."""
    innermost = cause_chain(error)[-1]
    return (str(innermost).splitlines() or [type(innermost).__name__])[0][:200]


def unreadable_file(folder: pathlib.Path, error: BaseException) -> str | None:
    """Which file of checkpoint `folder` could not be read, in a short phrase, from orbax's `error`.

    Orbax's messages are a bare JSON error or a TensorStore spec thousands of characters long; the
    JSON files are checked here, the TensorStore message is reduced to the file or array it names.
    None when the error names no file (e.g. a state that does not match the config).
    """
    chain = cause_chain(error)
    if any(isinstance(cause, json.JSONDecodeError) for cause in chain):
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix or path.name in ("_CHECKPOINT_METADATA", "manifest.ocdbt") \
                    or "d" in path.relative_to(folder).parts[:-1]:
                continue  # orbax reads _CHECKPOINT_METADATA leniently; d/ and manifest.ocdbt are binary
            try:
                json.loads(path.read_bytes())
            except ValueError as json_error:  # also UnicodeDecodeError
                return f"{path.relative_to(folder)} is not valid JSON ({json_error})"

    def relative(path: str) -> str:
        return str(pathlib.Path(path).relative_to(folder)) if pathlib.Path(path).is_relative_to(folder) else path

    for cause in chain:
        message = str(cause)
        decoding = re.search(r'Error decoding local file "([^"]+)": ([^\[]{0,120})', message)
        if decoding:
            return f"cannot read {relative(decoding.group(1))} ({decoding.group(2).strip()})"
        reading = re.search(r'Error reading "([^"/]+)[^"]*" in OCDBT database at local file "([^"]+)"', message)
        if reading:
            status = re.match(r"([A-Z][A-Z_]+): ", message)
            return (f"cannot read array {reading.group(1)!r} from its data files in {relative(reading.group(2))}/"
                    + (f" ({status.group(1)})" if status else ""))
    return None
