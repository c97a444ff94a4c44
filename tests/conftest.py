"""Shared fixtures: one tiny DATA_DIR per test session and the tiny config pointed at it.

The DATA_DIR is written once (per xdist worker) through the tiler's own writer,
`data_pipeline.shards.write_patch_dataset`, so the tests that train, evaluate or read a DATA_DIR share
its cost. The arrays it was written from are kept beside its path as the independent reference.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Callable

import ml_collections
import numpy as np
import pytest

# JAX's persistent compilation cache, set before anything imports jax (subprocesses inherit it): most
# tests compile the same few tiny programs again, and compiling is most of their CPU time (the training
# tests: 443 -> 153 CPU seconds). xdist workers share it; JAX writes an entry without a lock, and an
# entry read half-written is compiled again, with a warning, so sharing costs nothing in correctness.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                "gerne_jax_tests_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """Train 120, validation 40 and test 50 patches of 8x8x3 uint8, both classes in both bins at tau 0.1."""
    from data_pipeline.shards import write_patch_dataset  # TensorFlow: only for tests that need data

    path = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    splits = {name: tiny_split(rng, size, name[:2]) for name, size in TINY_SPLIT_SIZES.items()}
    write_patch_dataset(path, splits, channel_names=list(TINY_CHANNELS))
    return TinyDataset(path=path, splits=splits)


@pytest.fixture(scope="session")
def tiny_config(tiny_data: TinyDataset) -> Callable[..., ml_collections.ConfigDict]:
    """`tiny_config(arg)`: `configs/tiny.py`'s config for `arg` (e.g. "erm") reading `tiny_data`."""
    from configs import tiny

    def make(arg: str | None = None) -> ml_collections.ConfigDict:
        config = tiny.get_config(arg)
        config.data.dir = str(tiny_data.path)
        config.data.taus = (TINY_TAU,)
        return config

    return make


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
