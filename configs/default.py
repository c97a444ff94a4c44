"""Default configuration: GERNE on a DATA_DIR written by `python -m data_pipeline tile`.

Usage: `python train.py --config configs/default.py --workdir runs/x [--config.method.beta=1.5]`.
`get_config(arg)` takes comma-separated presets, e.g. `--config configs/gerne.py:tau=0.2,beta=1.5`.
"""
from __future__ import annotations

import ml_collections

METHODS = ("gerne", "erm")
SELECTION_METRICS = ("worst_group_accuracy", "balanced_class_accuracy", "worst_class_accuracy",
                     "group_balanced_accuracy", "average_accuracy", "auroc")

# Short names accepted in `get_config(arg)` presets, mapped to the config key they set.
PRESET_KEYS = {
    "tau": "data.taus", "taus": "data.taus", "data_dir": "data.dir", "beta": "method.beta",
    "c": "method.c", "corr": "method.corr", "lr": "optimizer.learning_rate", "model": "model.name",
    "norm": "model.norm", "steps": "training.steps", "seed": "training.seed",
    "batch": "training.batch_per_group", "select": "selection.metric",
}


def base_config() -> ml_collections.ConfigDict:
    """The unlocked default config; the presets in configs/*.py start from it."""
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dir = "runs/demo/data"     # a DATA_DIR from `python -m data_pipeline tile`
    config.data.taus = (0.1,)              # tissue-ratio thresholds: a = #{tau : r >= tau}
    config.data.in_memory = True           # False: read the array_record shards by index
    config.data.flips = False              # augmentation, off as in the papers
    config.data.rotations = False
    config.data.eval_batch_size = 256

    config.method = ml_collections.ConfigDict()
    config.method.name = "gerne"           # "gerne" (paired batches) or "erm" (the biased batch alone)
    config.method.beta = 1.0               # extrapolation factor, in [-1, beta_max]
    config.method.beta_warmup_steps = 0    # beta ramps linearly from 0 (resampling) over these steps
    config.method.c = 0.5                  # bias-reduction factor, in (0, 1]
    config.method.corr = 0.5               # overlap of the two batches' samples, in [0, 1]
    config.method.empty_group = "error"    # or "drop": leave empty groups out of the less-biased batch
    config.method.fold_beta_into_loss = False  # one-gradient fast path (no per-batch gradient metrics)
    config.method.divide_loss_by_num_classes = True

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"         # resnet18/34/50/101/152, tiny
    config.model.norm = "auto"             # frozen | shared | group | separate; auto: frozen with
                                           # pretrained weights, group from scratch
    config.model.dtype = "float32"         # compute dtype: float32 or bfloat16 (params stay float32)
    config.model.init_from = ""            # torchvision/timm ResNet weights (.safetensors or .pth)
    config.model.channel_mapping = ""      # per input channel: red|green|blue|mean|zero, comma-separated

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "constant"  # or "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 0.01   # coupled (added to the gradient), as in the official code

    config.training = ml_collections.ConfigDict()
    config.training.steps = 2000
    config.training.batch_per_group = 32   # B: each class gets A * B examples per batch
    config.training.eval_every = 100
    config.training.checkpoint_every = 100
    config.training.log_every = 10
    config.training.seed = 0

    config.selection = ml_collections.ConfigDict()
    config.selection.metric = "worst_group_accuracy"

    config.mesh = ml_collections.ConfigDict()
    config.mesh.num_devices = 0            # 0: all devices

    return config


def apply_presets(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies `key=value[,key=value...]`; keys are PRESET_KEYS' short names or dotted config keys.

    `tau` takes one value or several joined by `+` (`tau=0.03+0.1`).
    """
    for item in filter(None, (arg or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config preset {item!r} is not of the form key=value")
        key = PRESET_KEYS.get(name.strip(), name.strip())
        section, leaf = _section_and_leaf(config, key)
        section[leaf] = _parse_like(value.strip(), section[leaf], key)
    return config


def _section_and_leaf(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding dotted `key` and the key's last part; a ValueError for unknown keys."""
    parent, _, leaf = key.rpartition(".")
    section = config
    try:
        for part in filter(None, parent.split(".")):
            section = section[part]
        section[leaf]  # noqa: B018 - existence check
    except (KeyError, AttributeError, TypeError):
        raise ValueError(f"unknown config key {key!r}; preset short names: {sorted(PRESET_KEYS)}, "
                         "or any dotted key of the config") from None
    return section, leaf


def _parse_like(value: str, current, key: str):
    if key == "data.taus":
        return tuple(float(v) for v in value.split("+"))
    if isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config key {key} takes true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float) or current is None:
        return float(value)
    return value


def build(overrides: dict[str, object], arg: str | None) -> ml_collections.ConfigDict:
    """`base_config()` with dotted-key `overrides`, then the `arg` presets, locked."""
    config = base_config()
    for key, value in overrides.items():
        section, leaf = _section_and_leaf(config, key)
        section[leaf] = value
    config = apply_presets(config, arg)
    config.lock()
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return build({}, arg)
