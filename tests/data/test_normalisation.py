"""On-device standardisation against numpy, its sharding, and the checks of the channel statistics."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from gerne_jax.core import sharding
from gerne_jax.core.errors import InputError
from gerne_jax.data import normalisation

MEAN, STD = (180.5, 90.0, 200.25), (30.0, 45.5, 12.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_standardiser_equals_numpy_float32_and_keeps_the_batch_sharding(dtype):
    rng = np.random.default_rng(0)
    batch = (rng.uniform(0, 255, size=(2, 8, 5, 5, 3))).astype(dtype)  # [R, N, P, P, C], a training batch
    mesh = sharding.make_mesh()
    placed = sharding.shard_batch({"image": batch}, mesh)["image"]
    result = normalisation.Standardiser(MEAN, STD, mesh, num_channels=3)(placed)
    assert result.dtype == np.float32 and result.shape == batch.shape
    assert result.sharding == placed.sharding
    # float32 arithmetic (XLA may round the division differently from numpy in the last bit).
    np.testing.assert_allclose(np.asarray(result), (batch.astype(np.float64) - MEAN) / STD, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mean, std, channels, message", [
    ((1.0, 2.0), (1.0, 1.0), 3, r"channel_mean \(2\) and channel_std \(2\) must have one value per .* channel \(3\)"),
    ((1.0, 2.0, 3.0), (1.0, 1.0), None, r"channel_mean \(3\) and channel_std \(2\)"),
    ((1.0, 2.0, 3.0), (1.0, 0.0, 1.0), 3, r"channel 1 has mean 2.0 and std 0.0"),
    ((1.0, 2.0, float("nan")), (1.0, 1.0, 1.0), 3, r"channel 2 has mean nan"),
    ((1.0, 2.0, 3.0), (1.0, 1.0, float("inf")), 3, r"channel 2 has mean 3.0 and std inf"),
])
def test_bad_channel_statistics_name_the_channel(mean, std, channels, message):
    with pytest.raises(InputError, match=message):
        normalisation.Standardiser(mean, std, sharding.make_mesh(), num_channels=channels)


def test_standardiser_of_metadata_takes_its_channel_statistics_and_checks_them():
    mesh = sharding.mesh_of(ml_collections.ConfigDict({"num_devices": 0}))  # 0: every device
    assert mesh.devices.size == jax.device_count()
    standardise = normalisation.Standardiser.of({"channel_mean": list(MEAN), "channel_std": list(STD)}, mesh, 3)
    np.testing.assert_array_equal(np.asarray(standardise.mean), np.float32(MEAN))
    np.testing.assert_array_equal(np.asarray(standardise.std), np.float32(STD))
    with pytest.raises(InputError, match=r"one value per image channel \(4\)"):
        normalisation.Standardiser.of({"channel_mean": list(MEAN), "channel_std": list(STD)}, mesh, 4)


def test_standardise_inside_a_jitted_function_fuses_with_the_consumer():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    mean, std = normalisation.channel_statistics(MEAN, STD)
    total = jax.jit(lambda x: normalisation.standardise(x, mean, std).sum())(images)
    np.testing.assert_allclose(float(total), ((images.astype(np.float64) - MEAN) / STD).sum(), rtol=1e-5)
