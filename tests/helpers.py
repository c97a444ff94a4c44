"""What several test modules share: the repository's path, the tiny DATA_DIR's data, killing a training
run at a step, and the train command run in this process. (conftest.py builds its fixtures from these.)"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_PATCH, TINY_CHANNELS = 8, ("CARS", "TPEF", "SHG")
TINY_TAU = 0.1
TINY_SPLIT_SIZES = {"train": 120, "validation": 40, "test": 50}


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    """A DATA_DIR and, per split, the fields (code names) it was written from, in index order."""

    path: pathlib.Path
    splits: dict[str, dict[str, np.ndarray]]


def tiny_split(rng: np.random.Generator, size: int, slide_prefix: str) -> dict[str, np.ndarray]:
    """Alternating labels; a quarter of the tumour and three quarters of the non-tumour patches below
    the tissue-ratio threshold TINY_TAU (the spurious correlation), so all four groups are non-empty.

    Images are uint8 `[size, 8, 8, 3]` with a learnable tumour signature (+40) in channel 0.
    """
    label = np.arange(size) % 2
    rank = np.zeros(size, np.int64)  # position of each patch within its class
    for y in (0, 1):
        rank[label == y] = np.arange(np.sum(label == y))
    class_size = np.bincount(label, minlength=2)[label]
    low_share = np.where(label == 1, 0.25, 0.75)
    low = rank < np.rint(low_share * class_size)
    tissue_ratio = np.where(low, rng.uniform(0.01, TINY_TAU - 0.01, size), rng.uniform(TINY_TAU, 1.0, size))
    image = rng.integers(0, 200, (size, TINY_PATCH, TINY_PATCH, len(TINY_CHANNELS))).astype(np.uint8)
    image[label == 1, :, :, 0] += 40
    slides = np.array([f"{slide_prefix}{i % 3}" for i in range(size)])
    return {"image": image, "label": label, "tumour_fraction": label * 0.5,
            "tissue_ratio": tissue_ratio.astype(np.float32), "slide_id": slides, "patient_id": slides,
            "x": np.arange(size) * TINY_PATCH, "y": np.zeros(size, np.int64)}


def kill_training_at_step(monkeypatch, step: int):
    """Makes every train step built from now on raise KeyboardInterrupt (a simulated kill) as it starts `step`;
    returns the real `make_train_step` to put back."""
    from gerne_jax.train import train_step

    real_make_train_step = train_step.make_train_step

    def make_killed_step(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def killed(state, batch):
            if int(state.step) == step:
                raise KeyboardInterrupt("simulated kill")
            return step_fn(state, batch)
        return killed

    monkeypatch.setattr(train_step, "make_train_step", make_killed_step)
    return real_make_train_step


def train_command(args: list[str]) -> int:
    """`gerne-jax train ARGS` in this process: its exit status (an InputError is one line and status 2)."""
    from gerne_jax.commands import train
    from gerne_jax.core import cli

    train.FLAGS.unparse_flags()  # absl keeps the values of an earlier parse
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run_command(lambda: train.main(args))
    finally:
        train.FLAGS.unparse_flags()
    return exit_info.value.code or 0  # app.run exits with None after a run that returned


# The only file whose bytes legitimately differ between two runs: the lock records the holder's pid.
RUN_SPECIFIC = {".lock"}


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones and .work/ too) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def restore_latest(workdir: pathlib.Path, target: Any) -> tuple[Any, dict[str, Any]]:
    """The whole state (optimiser included) of a run's latest checkpoint, restored into `target`, and its meta."""
    from gerne_jax.runs import checkpoints

    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        return run.restore(checkpoints.LATEST, target)
    finally:
        run.close()
