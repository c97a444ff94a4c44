"""Orbax checkpoints of one run: the latest (for resuming) and the best by each selection metric.

Layout under `WORKDIR/checkpoints/`:
- `latest/<step>/`: the most recent `keep_latest` states, for resuming;
- `best_wga/<step>/`, `best_bca/<step>/`, ...: the single state with the best validation value of
  that metric so far (ties keep the earlier step).
Each checkpoint holds the train state and a JSON `meta` item: the step, the config and the
validation metrics it was chosen on. Saving is synchronous, and orbax writes every checkpoint to a
temporary folder that it renames when complete, so a killed run never leaves a half-written one.
"""
from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp

from gerne_jax.errors import InputError

# Checkpoint names `evaluate.py --checkpoint` accepts, and the validation metric each one tracks.
BEST_CHECKPOINTS = {
    "best_wga": "worst_group_accuracy",
    "best_bca": "balanced_class_accuracy",
    "best_worst_class": "worst_class_accuracy",
}
LATEST = "latest"


class CheckpointError(InputError):
    """A checkpoint that is missing or cannot be read; the message names the folder."""


def _manager(directory: pathlib.Path, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           enable_async_checkpointing=False, read_only=read_only)
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
        self._best_values = {name: self._restored_best_value(name) for name in BEST_CHECKPOINTS}

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
        if isinstance(name_or_step, int) or str(name_or_step).isdigit():
            name, step = LATEST, int(name_or_step)
            if step not in self._managers[LATEST].all_steps():
                raise CheckpointError(f"no checkpoint of step {step} in {self.root / LATEST}; "
                                      f"steps kept: {sorted(self._managers[LATEST].all_steps())}")
        else:
            name, step = str(name_or_step), self.latest_step(str(name_or_step))
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.root / name}")
        try:
            restored = self._managers[name].restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target_state), meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types for damaged or mismatched files
            raise CheckpointError(f"cannot restore {self.root / name / str(step)}: {error}") from error
        return restored["state"], restored["meta"]

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
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()

    def _restored_best_value(self, name: str) -> float | None:
        manager = self._managers[name]
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return meta["metrics"].get(BEST_CHECKPOINTS[name])
