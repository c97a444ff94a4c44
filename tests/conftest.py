"""Shared fixtures: one tiny DATA_DIR per test session and the tiny config pointed at it.

The DATA_DIR is written once (per xdist worker) through the tiler's own writer,
`data_pipeline.shards.write_patch_dataset`, so the tests that train, evaluate or read a DATA_DIR share
its cost. The arrays it was written from are kept beside its path as the independent reference.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import ml_collections
import numpy as np
import pytest

from tests.helpers import TINY_CHANNELS, TINY_SPLIT_SIZES, TINY_TAU, TinyDataset, tiny_split

# JAX's persistent compilation cache, set before anything imports jax (subprocesses inherit it): most
# tests compile the same few tiny programs again, and compiling is most of their CPU time (the training
# tests: 443 -> 153 CPU seconds). xdist workers share it; JAX writes an entry without a lock, and an
# entry read half-written is compiled again, with a warning, so sharing costs nothing in correctness.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                "gerne_jax_tests_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The prediction tests' slides and tiny run (`slide_run`): a fixture of a helper module, loaded after the
# environment above is set.
pytest_plugins = ["tests.slide_run"]

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
