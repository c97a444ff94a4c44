"""A few steps of the tiny ResNet on tiny batches, for tests and smoke checks: `configs/tiny.py:erm`."""
from __future__ import annotations

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = default.get_config(arg)
    config.model.name = "tiny"
    config.optimizer.learning_rate = 0.01
    config.training.steps = 4
    config.training.batch_per_group = 2
    config.training.eval_every = 2
    config.training.checkpoint_every = 2
    config.training.log_every = 1
    config.data.eval_batch_size = 32
    return config
