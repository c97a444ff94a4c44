"""Per-channel standardisation of patches, done on the device.

The input pipelines hand over patches in their source dtype (uint8 for most slides) and every consumer
(the training loop, evaluation, precise BatchNorm, whole-slide prediction) standardises them on the
devices they are placed on, with the one function here:

    standardised[..., c] = (float32(image[..., c]) - mean[c]) / std[c]

in float32 (subtract, then divide), `mean` and `std` being the DATA_DIR's channel statistics in source
units. Done on the host, TensorFlow's cast and standardisation cost about 8 CPU ms per batch of 64
patches of 64 pixels, four times the rest of the batch's host work (gather, augmentation, transfer),
and the float32 batch is four times the bytes of a uint8 one to copy to an accelerator; on the device
the same work is one elementwise pass that XLA fuses.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.core.errors import InputError


def channel_statistics(channel_mean: Sequence[float], channel_std: Sequence[float],
                       num_channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 vectors, checked: one finite mean and one positive, finite std per channel
    (`num_channels` of them when given); an `InputError` names the channel at fault."""
    mean = np.asarray(channel_mean, np.float32).reshape(-1)
    std = np.asarray(channel_std, np.float32).reshape(-1)
    expected = mean.size if num_channels is None else num_channels
    if mean.size != expected or std.size != expected:
        raise InputError(f"channel_mean ({mean.size}) and channel_std ({std.size}) must have one value per "
                         f"image channel ({expected})")
    bad = np.flatnonzero(~np.isfinite(std) | (std <= 0) | ~np.isfinite(mean))
    if bad.size:
        raise InputError(f"channel {bad[0]} has mean {mean[bad[0]]} and std {std[bad[0]]}; normalisation "
                         "needs a finite mean and a positive std for every channel")
    return mean, std


def standardise(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """`(float32(images) - mean) / std` over the last (channel) axis; usable inside a jitted function."""
    return (images.astype(jnp.float32) - mean) / std


_jitted_standardise = jax.jit(standardise)


class Standardiser:
    """Standardises placed batches of patches on their devices (module docstring).

    Args:
      channel_mean, channel_std: the DATA_DIR's channel statistics (its metadata), in source units.
      mesh: the devices the batches live on; mean and std are replicated over them.
      num_channels: the patches' channel count, checked against the statistics when given.

    `standardiser(images)` takes a `jax.Array` of any shape `[..., C]` and any sharding and returns the
    float32 array with the same shape and sharding, without waiting for the devices.
    """

    def __init__(self, channel_mean: Sequence[float], channel_std: Sequence[float], mesh: Mesh,
                 num_channels: int | None = None):
        mean, std = channel_statistics(channel_mean, channel_std, num_channels)
        replicated = sharding.replicated_sharding(mesh)
        self.mean, self.std = jax.device_put(mean, replicated), jax.device_put(std, replicated)

    @classmethod
    def of(cls, metadata: Mapping[str, Any], mesh: Mesh, num_channels: int | None = None) -> Standardiser:
        """The standardiser of a DATA_DIR's metadata (`dataset.read_metadata`, or a run's data spec's copy)."""
        return cls(metadata["channel_mean"], metadata["channel_std"], mesh, num_channels)

    def __call__(self, images: jax.Array) -> jax.Array:
        return _jitted_standardise(images, self.mean, self.std)
