"""ImageNet-pretrained torchvision / timm ResNet weights for the Flax ResNets of `gerne_jax.models.resnet`.

`load_pretrained(path, model, variables)` reads a ResNet state dict (`.safetensors` with numpy
alone; `.pth` / `.pt` / `.bin` when torch is importable) and returns new `{"params",
"batch_stats"}` for `model`:

- Every convolution, BatchNorm (scale, bias, running mean and variance) is copied from the
  checkpoint, converted to Flax layout: conv `[O, I, kh, kw]` -> `[kh, kw, I, O]`.
- The classifier head `fc` is not loaded: it keeps the fresh initialisation in `variables`
  (made by `model.init` for the run's `num_classes`). The checkpoint may hold an `fc` of any shape
  or none at all.
- The stem convolution is adapted to the data's C input channels: by default the mean of the RGB
  filters, repeated C times and rescaled by 3 / C (so a grey image repeated over the C channels
  gives the stem the same response as the grey RGB image); or a channel mapping naming, for each
  input channel, which RGB filter it takes: "red", "green", "blue", "mean" or "zero", rescaled by
  3 / (number of non-"zero" channels). An identity mapping of 3 channels is the RGB model itself.

Key names: torchvision and timm ResNets share one layout (timm's `ResNet` names its modules
`conv1`, `bn1`, `layer{1-4}`, blocks with `conv1..3`/`bn1..3`, shortcut `downsample.0` (conv) and
`downsample.1` (norm), head `fc`), e.g. `layer2.0.downsample.1.running_var`. Flax module
`layer2_0/downsample_bn` is torch's `layer2.0.downsample.1`. Checkpoints nested under
"state_dict" or "model" and keys prefixed "module." (DataParallel) are accepted; timm variants
with other stems or shortcuts (resnet50d, SE, ...) are rejected with the offending keys listed.

Only the BatchNorm modes of `gerne_jax.models.resnet` ("frozen", "shared", "separate") can take
ImageNet BatchNorm weights; "group" (GroupNorm + weight standardisation) is a different network.
With pretrained weights the default mode is "frozen", as in the official GERNE code (docs/design.md §4).

No TensorFlow here, and no torch unless a `.pth` file is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gerne_jax.core.errors import InputError
from gerne_jax.models.resnet import BATCH_NORM_MODES, ResNet

# For each input channel, the RGB filter it takes; "mean" averages the three, "zero" ignores it.
CHANNEL_SOURCES = ("red", "green", "blue", "mean", "zero")
RGB = ("red", "green", "blue")
PRETRAINED_NORM = "frozen"  # default norm with pretrained weights (official GERNE)
SCRATCH_NORM = "group"      # default norm when training from scratch
AUTO_NORM = "auto"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_STEM_KERNEL = ("conv1", "kernel")
_HEAD = "fc"
_MAX_LISTED_KEYS = 20


def resolve_norm(norm: str, init_from: str) -> str:
    """`norm`, or for `norm == "auto"` "frozen" with pretrained weights and "group" without."""
    if norm != AUTO_NORM:
        return norm
    return PRETRAINED_NORM if init_from else SCRATCH_NORM


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch-layout ResNet state dict as float32 numpy arrays, keyed like torchvision.

    Unwraps a dict nested under "state_dict" or "model", strips a "module." prefix shared by every
    key, and drops BatchNorm's `num_batches_tracked` counters.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"pretrained weights {path!r} do not exist (config model.init_from)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt or bf16 files
            raise InputError(f"cannot read {path!r} as safetensors with numpy: {e}") from e
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise InputError(f"pretrained weights {path!r}: unknown file type {suffix!r}; expected "
                         f".safetensors or one of {TORCH_SUFFIXES}")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    arrays = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not isinstance(value, np.ndarray):
            raise InputError(f"{path!r}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                             "expected a ResNet state dict")
        arrays[key] = value.astype(np.float32)
    return arrays


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs torch; install it or convert the file to "
                          ".safetensors (see docs/methods.md, 'Pretrained weights')") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise InputError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    def to_numpy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().float().numpy()
        if isinstance(value, Mapping):
            return {k: to_numpy(v) for k, v in value.items()}
        return value
    return to_numpy(state)


def torch_key(collection: str, flax_path: tuple[str, ...]) -> str:
    """torchvision key of a Flax variable, e.g. ("params", ("layer1_0", "downsample_bn", "scale"))
    -> "layer1.0.downsample.1.weight"."""
    *modules, leaf = flax_path
    names = []
    for module in modules:
        module = re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", module)
        module = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(module, module)
        names.append(module)
    leaf_names = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
                  "batch_stats": {"mean": "running_mean", "var": "running_var"}}
    if leaf not in leaf_names.get(collection, {}):
        raise InputError(f"no torchvision name for Flax variable {collection}/{'/'.join(flax_path)}")
    return ".".join(names + [leaf_names[collection][leaf]])


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    """torch conv [O, I, kh, kw] -> [kh, kw, I, O]; linear [O, I] -> [I, O]; vectors unchanged."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def parse_channel_mapping(channel_mapping: str | Sequence[str] | None,
                          num_input_channels: int) -> tuple[str, ...]:
    """Validated per-channel sources; `None` or "" gives the default (RGB for 3 channels, else mean).

    A string is split at commas: "red,green,blue,mean".
    """
    if channel_mapping is None or channel_mapping == "" or channel_mapping == ():
        return RGB if num_input_channels == 3 else ("mean",) * num_input_channels
    if isinstance(channel_mapping, str):
        channel_mapping = [name.strip() for name in channel_mapping.split(",")]
    mapping = tuple(channel_mapping)
    unknown = [name for name in mapping if name not in CHANNEL_SOURCES]
    if unknown:
        raise InputError(f"channel mapping {mapping}: unknown source(s) {unknown}; each input channel "
                         f"takes one of {CHANNEL_SOURCES}")
    if len(mapping) != num_input_channels:
        raise InputError(f"channel mapping {mapping} names {len(mapping)} channels but the data has "
                         f"{num_input_channels}")
    if all(name == "zero" for name in mapping):
        raise InputError(f"channel mapping {mapping} maps every channel to 'zero'")
    return mapping


def adapt_stem_kernel(rgb_kernel: np.ndarray, mapping: Sequence[str]) -> np.ndarray:
    """Stem filters `[O, 3, kh, kw]` (torch layout) -> `[O, C, kh, kw]` for `mapping` of length C.

    Each channel takes its named RGB filter (or their mean, or zeros); all are rescaled by
    3 / (number of non-"zero" channels) so that the summed filter weight stays that of RGB.
    """
    if rgb_kernel.ndim != 4 or rgb_kernel.shape[1] != 3:
        raise InputError(f"stem kernel must be [O, 3, kh, kw] (RGB), got {rgb_kernel.shape}")
    sources = {name: rgb_kernel[:, i] for i, name in enumerate(RGB)}
    sources["mean"] = rgb_kernel.mean(axis=1)
    sources["zero"] = np.zeros_like(rgb_kernel[:, 0])
    num_used = sum(name != "zero" for name in mapping)
    return np.stack([sources[name] for name in mapping], axis=1) * (3.0 / num_used)


def _describe(keys: Sequence[str]) -> str:
    """Architecture of a torchvision key set, e.g. "ResNet-50 (blocks per stage (3, 4, 6, 3))"."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in keys:
        match = re.match(r"layer(\d+)\.(\d+)\.(conv\d)", key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
            bottleneck |= match[3] == "conv3"
    stages = tuple(len(blocks[stage]) for stage in sorted(blocks))
    depth = 2 + sum(stages) * (3 if bottleneck else 2)
    kind = "bottleneck" if bottleneck else "basic"
    return f"ResNet-{depth} ({kind} blocks per stage {stages})"


def _listing(title: str, items: Sequence[str]) -> str:
    shown = list(items[:_MAX_LISTED_KEYS])
    more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}): {', '.join(shown)}{more}"


def convert_state_dict(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                       channel_mapping: str | Sequence[str] | None = None,
                       source: str = "checkpoint") -> dict[str, Any]:
    """Flax `{"params", "batch_stats"}` shaped like `variables`, filled from a torch state dict.

    `variables` is the model's fresh initialisation: it fixes every shape (the stem's input
    channels included) and supplies the classifier head. `source` names the checkpoint in errors.
    """
    if "batch_stats" not in variables:
        raise InputError("the model has no BatchNorm statistics (norm 'group'?): ImageNet BatchNorm "
                         f"weights fit only the norm modes {BATCH_NORM_MODES}")
    template = {(collection, path): value
                for collection in ("params", "batch_stats")
                for path, value in traverse_util.flatten_dict(dict(variables[collection])).items()}
    wanted = {torch_key(collection, path): (collection, path) for collection, path in template
              if path[0] != _HEAD}
    head_keys = {key for key in state_dict if key.split(".")[0] == _HEAD}
    missing = sorted(set(wanted) - set(state_dict))
    extra = sorted(set(state_dict) - set(wanted) - head_keys)

    mapping = None
    stem_shape = template[("params", _STEM_KERNEL)].shape
    num_input_channels = stem_shape[2]
    stem_in = state_dict["conv1.weight"].shape[1] if "conv1.weight" in state_dict else None
    if stem_in == 3 and (channel_mapping or num_input_channels != 3):
        mapping = parse_channel_mapping(channel_mapping, num_input_channels)
    elif channel_mapping and stem_in is not None:
        raise InputError(f"{source}: a channel mapping needs RGB stem filters, but conv1.weight has "
                         f"{stem_in} input channels")

    converted, mismatched = {}, []
    for key, (collection, path) in wanted.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if mapping is not None and (collection, path) == ("params", _STEM_KERNEL):
            value = adapt_stem_kernel(value, mapping)
        value = _to_flax_layout(value)
        expected = template[(collection, path)].shape
        if value.shape != tuple(expected):
            mismatched.append(f"{key} {tuple(state_dict[key].shape)} (Flax {value.shape}, "
                              f"model wants {tuple(expected)})")
        converted[(collection, path)] = value

    if missing or extra or mismatched:
        message = f"{source} does not fit the model"
        found, expected_arch = _describe(list(state_dict)), _describe(list(wanted))
        if found != expected_arch:
            message += f": the checkpoint is a {found}, the model a {expected_arch}"
        if mismatched and stem_in not in (None, 3, num_input_channels):
            message += (f"; the checkpoint's stem has {stem_in} input channels, the data "
                        f"{num_input_channels}, and only RGB stems can be adapted")
        message += _listing("missing from the checkpoint", missing)
        message += _listing("unexpected in the checkpoint", extra)
        message += _listing("shape mismatch", mismatched)
        raise InputError(message)

    for collection, path in template:
        if path[0] == _HEAD:
            converted[(collection, path)] = template[(collection, path)]
    result = {}
    for collection in ("params", "batch_stats"):
        flat = {path: jnp.asarray(value, dtype=jnp.float32)
                for (c, path), value in converted.items() if c == collection}
        result[collection] = traverse_util.unflatten_dict(flat)
    return result


def load_pretrained(path: str | os.PathLike, model: ResNet, variables: Mapping[str, Any],
                    channel_mapping: str | Sequence[str] | None = None) -> dict[str, Any]:
    """New `{"params", "batch_stats"}` for `model` from the torchvision/timm ResNet at `path`.

    Args:
      path: `.safetensors` (numpy only) or `.pth`/`.pt`/`.bin` (needs torch) state dict of the
        ResNet of the same depth as `model`.
      model: a BatchNorm-mode `gerne_jax.models.resnet.ResNet` ("frozen", "shared" or "separate").
      variables: `model.init(...)` output for the run's input channels and `num_classes`; fixes all
        shapes and provides the re-initialised classifier head `fc`.
      channel_mapping: per input channel, one of `CHANNEL_SOURCES` (a sequence, or a comma-separated
        string); `None` or "" for the default (RGB as-is for 3 channels, else the rescaled mean).

    Raises:
      ValueError: `model.norm` is "group", or the checkpoint does not fit (wrong depth, missing or
        extra keys, shapes), listing the offending keys.
    """
    if model.norm not in BATCH_NORM_MODES:
        raise InputError(f"pretrained weights {os.fspath(path)!r} hold BatchNorm layers, which fit only "
                         f"the norm modes {BATCH_NORM_MODES}; the model has norm {model.norm!r} "
                         f"(set model.norm to {PRETRAINED_NORM!r})")
    state_dict = read_state_dict(path)
    return convert_state_dict(state_dict, variables, channel_mapping, source=repr(os.fspath(path)))
