"""A few steps of the tiny ResNet on tiny batches: for tests and smoke checks."""
from configs import default


def get_config(arg: str | None = None):
    overrides = {
        "model.name": "tiny",
        "optimizer.learning_rate": 0.01,
        "training.steps": 4,
        "training.batch_per_group": 2,
        "training.eval_every": 2,
        "training.checkpoint_every": 2,
        "training.log_every": 1,
        "data.eval_batch_size": 32,
    }
    return default.build(overrides, arg)
