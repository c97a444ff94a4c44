"""The `make demo` setting: a small ResNet on 64-pixel synthetic patches, minutes on 2 CPU cores.

`arg` picks the method: `get_config("erm")`, `get_config("gerne")` (default) or `get_config("resample")`,
followed by optional presets: `get_config("gerne,beta=0.5")`.
"""
from configs import default

METHOD_OVERRIDES = {
    "gerne": {"method.name": "gerne", "method.beta": 1.0, "method.c": 0.5},
    "erm": {"method.name": "erm", "method.beta": -1.0},
    "resample": {"method.name": "gerne", "method.c": 1.0, "method.beta": 0.0},
}


def get_config(arg: str | None = None):
    method, _, presets = (arg or "gerne").partition(",")
    if method not in METHOD_OVERRIDES:
        raise ValueError(f"configs/demo.py: unknown method {method!r}; choose one of {sorted(METHOD_OVERRIDES)}")
    overrides = {
        "data.dir": "runs/demo/data",
        "model.name": "resnet18",
        "model.norm": "group",
        "optimizer.learning_rate": 0.01,
        "optimizer.weight_decay": 1e-4,
        "training.steps": 400,
        "training.batch_per_group": 8,
        "training.eval_every": 50,
        "training.checkpoint_every": 50,
        **METHOD_OVERRIDES[method],
    }
    return default.build(overrides, presets)
