"""Flax Linen ResNets (torchvision layout) with a configurable normalisation.

The structure and module names follow torchvision's ResNet so that ImageNet weights can be
loaded by name later: a 7x7 stride-2 stem conv without bias (`conv1`), its norm (`bn1`), a 3x3
stride-2 max pool, stages of residual blocks named `layer{stage}_{block}` (e.g. `layer1_0`), each
with `conv1`/`bn1`, `conv2`/`bn2` (and `conv3`/`bn3` for bottlenecks; the stride sits on the 3x3
conv, "ResNet v1.5"), a projection shortcut `downsample_conv` + `downsample_bn` where shape
changes, global average pooling and a linear classifier `fc` with bias. Norm layers keep the
torchvision names `bn*` whatever the normalisation is.

`norm` decides how a norm layer behaves (docs/design.md §4 explains why this matters for GERNE):

- "frozen": BatchNorm that always uses its running statistics (never updates them); a sample's
  output does not depend on the rest of the batch. The official GERNE setting with pretrained
  weights.
- "shared": train-mode BatchNorm; the train step feeds both GERNE batches through one pass over
  their concatenation, so both are normalised by the same statistics.
- "separate": train-mode BatchNorm; the train step normalises each GERNE batch by its own
  statistics (as two PyTorch forward passes would). Unstable with beta > 0: the network can tell
  the batches apart by their composition. Kept for comparison only.
- "group": GroupNorm with weight-standardised convolutions (BiT, as in big_vision), at most 32
  groups (fewer for narrow layers); no dependence on batch composition and no running statistics.
  The default when training from scratch.

The model itself only knows "BatchNorm, frozen or train-mode" versus "GroupNorm"; the difference
between "shared" and "separate" is how `gerne_jax.train.train_step` batches the forward pass.

Parameters are float32 (`param_dtype`); `dtype` is the compute dtype (float32 or bfloat16).
Logits are returned in float32. Any number of input channels works: the stem's kernel takes its
input depth from the data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORM_MODES = ("frozen", "shared", "separate", "group")
BATCH_NORM_MODES = ("frozen", "shared", "separate")  # modes whose model carries `batch_stats`
TRAIN_MODE_BATCH_NORM = ("shared", "separate")  # modes whose running statistics update in training

# torchvision BatchNorm defaults: momentum 0.1 on the new value == Flax momentum 0.9 on the old.
_BN_MOMENTUM = 0.9
_NORM_EPSILON = 1e-5
_MAX_GROUPS = 32
# The collection that holds the penultimate embedding (after global pooling, before `fc`) when it is
# made mutable: `model.apply(variables, images, mutable=[EMBEDDING])` (DFR's features, gerne_jax.methods.dfr).
EMBEDDING = "embedding"


def num_groups_for(features: int, max_groups: int = _MAX_GROUPS) -> int:
    """Largest group count <= `max_groups` that divides `features` (32 for every standard ResNet)."""
    return max(g for g in range(1, min(max_groups, features) + 1) if features % g == 0)


class StdConv(nn.Conv):
    """Convolution with a weight-standardised kernel (zero mean, unit variance per output unit).

    The standardisation is part of the forward pass; the stored kernel stays the raw parameter.
    Same parameters as `nn.Conv`, so parameter counts match the BatchNorm variant exactly.
    """

    def param(self, name: str, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        if name == "kernel":
            mean = jnp.mean(param, axis=(0, 1, 2), keepdims=True)
            var = jnp.var(param, axis=(0, 1, 2), keepdims=True)
            param = (param - mean) / jnp.sqrt(var + 1e-10)
        return param


def _make_norm(norm: str, train: bool, dtype: Any,
               axis_name: str | None) -> Callable[[int, str], nn.Module]:
    """Returns `make(features, name)` building the norm layer of mode `norm` for that width."""
    def make(features: int, name: str) -> nn.Module:
        if norm == "group":
            return nn.GroupNorm(num_groups=num_groups_for(features), epsilon=_NORM_EPSILON,
                                dtype=dtype, name=name)
        return nn.BatchNorm(use_running_average=norm == "frozen" or not train,
                            momentum=_BN_MOMENTUM, epsilon=_NORM_EPSILON, dtype=dtype,
                            axis_name=axis_name, name=name)
    return make


def _add_shortcut(block: nn.Module, residual: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """relu(y + shortcut): identity, or a strided 1x1 conv + norm where the shape changes.

    Called from a block's compact `__call__`, so the projection's layers belong to that block.
    """
    if residual.shape != y.shape:
        features = y.shape[-1]
        residual = block.conv(features, (1, 1), strides=block.strides, name="downsample_conv")(residual)
        residual = block.norm(features, "downsample_bn")(residual)
    return nn.relu(y + residual)


class _ResidualBlock(nn.Module):
    """What every block takes: its width, stride, and the conv / norm factories of the network."""

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[[int, str], nn.Module]


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet-18/34 block); stride on the first."""

    expansion = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        # torchvision pads every 3x3 conv by 1 on each side; "SAME" would pad (0, 1) at stride 2.
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(self.features, "bn1")(y))
        y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
        y = self.norm(self.features, "bn2")(y)
        return _add_shortcut(self, residual, y)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (with the stride) -> 1x1 x4 bottleneck (ResNet-50/101/152 block)."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(self.features, "bn1")(y))
        # torchvision pads every 3x3 conv by 1 on each side; "SAME" would pad (0, 1) at stride 2.
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
        y = nn.relu(self.norm(self.features, "bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        y = self.norm(self.features * self.expansion, "bn3")(y)
        return _add_shortcut(self, residual, y)


class ResNet(nn.Module):
    """torchvision-layout ResNet. Call as `model.apply(variables, images, train=...)`.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: number of output logits.
      norm: one of `NORM_MODES` (see the module docstring).
      num_filters: width of the first stage (64 in torchvision); stage i has `num_filters * 2**i`.
      dtype: compute dtype (parameters are always float32).
      batch_norm_axis_name: mapped axis over which train-mode BatchNorm averages its statistics
        (set by the sharded train step on its copy of the model; None for ordinary use).
      features_only: return the feature maps `[stem, stage 1, ..., stage S]` (the stem's after its norm and
        ReLU, before the max pool; each stage's after its last block) instead of logits, without pooling
        or `fc`: the backbone of a dense head (`gerne_jax.models.segmentation`). Parameter names are unchanged.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    norm: str = "group"
    num_filters: int = 64
    dtype: Any = jnp.float32
    batch_norm_axis_name: str | None = None
    features_only: bool = False

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
        if self.norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {self.norm!r}")
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        conv_cls = StdConv if self.norm == "group" else nn.Conv
        conv = functools.partial(conv_cls, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                 padding="SAME")
        norm = _make_norm(self.norm, train, self.dtype, self.batch_norm_axis_name)

        x = conv(self.num_filters, (7, 7), strides=2, padding=[(3, 3), (3, 3)], name="conv1")(images)
        x = nn.relu(norm(self.num_filters, "bn1")(x))
        features = [x]
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = self.block_cls(features=self.num_filters * 2**stage, strides=strides, conv=conv,
                                   norm=norm, name=f"layer{stage + 1}_{block}")(x)
            features.append(x)
        if self.features_only:
            return features
        x = jnp.mean(x, axis=(1, 2))
        if not self.is_initializing():  # not a variable of `init`; a no-op unless the collection is mutable
            self.sow(EMBEDDING, EMBEDDING, x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
# For tests: two stages of one basic block, 8 and 16 channels (GroupNorm uses 8 and 16 groups).
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=8)

MODELS: dict[str, Callable[..., ResNet]] = {
    "tiny": ResNetTiny,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}


def create_model(name: str, *, num_classes: int, norm: str = "group",
                 dtype: Any = jnp.float32) -> ResNet:
    """Builds a model of `MODELS` by name, e.g. `create_model("resnet50", num_classes=2)`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes=num_classes, norm=norm, dtype=jnp.dtype(dtype))
