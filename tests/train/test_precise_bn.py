"""Precise BatchNorm: statistics against numpy, natural-distribution batches, the training loop's use.

The recomputed statistics are checked against an independent computation: the stem's convolution done
by hand in numpy for the first BatchNorm layer, and Flax's captured intermediates (a convolution's
output) for a deeper one, with the per-batch mean and variance averaged over the same batches.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

from gerne_jax.core import sharding
from gerne_jax.data import dataset, input_pipeline, normalisation
from gerne_jax.methods import registry
from gerne_jax.models.resnet import create_model
from gerne_jax.runs import run_log
from gerne_jax.train import batch_stats, train_step
from gerne_jax.train.train_state import create_train_state
from tests.helpers import kill_training_at_step

CHANNEL_MEAN, CHANNEL_STD = (100.0, 100.0, 100.0), (50.0, 50.0, 50.0)


def _state(norm: str, seed: int = 0):
    model = create_model("tiny", num_classes=2, norm=norm)
    state = create_train_state(jax.random.key(seed), model, (1, 8, 8, 3), optax.sgd(0.1))
    # Perturb the parameters so no layer is at its initial (zero-bias, unit-scale) value.
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    return model, state.replace(params=jax.tree.unflatten(tree, leaves))


def _stem_conv_numpy(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """torchvision's stem: 7x7 convolution, stride 2, padding 3, no bias, by explicit sums."""
    n, size, _, _ = images.shape
    padded = np.pad(images.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    out_size = (size + 6 - 7) // 2 + 1
    out = np.zeros((n, out_size, out_size, kernel.shape[-1]))
    for i in range(out_size):
        for j in range(out_size):
            window = padded[:, 2 * i:2 * i + 7, 2 * j:2 * j + 7, :]
            out[:, i, j] = np.einsum("nabc,abco->no", window, kernel.astype(np.float64))
    return out


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)


@pytest.mark.slow
def test_population_statistics_equal_numpy_moments_averaged_over_batches():
    model, state = _state("shared")
    rng = np.random.default_rng(0)
    # Source-unit batches, standardised on the device with the channel statistics.
    batches = [{"image": rng.normal(100 + 10 * k, 50, size=(16, 8, 8, 3)).astype(np.float32)} for k in range(3)]
    standardised = [(b["image"].astype(np.float64) - CHANNEL_MEAN) / CHANNEL_STD for b in batches]
    mesh = sharding.make_mesh()
    result = batch_stats.population_statistics(state, model, batches, mesh,
                                               normalisation.Standardiser(CHANNEL_MEAN, CHANNEL_STD, mesh))
    assert jax.tree.structure(result) == jax.tree.structure(state.batch_stats)

    # First BatchNorm layer: its input is the stem convolution of the images, computed here by hand.
    kernel = np.asarray(state.params["conv1"]["kernel"])
    per_batch = [_moments(_stem_conv_numpy(images, kernel)) for images in standardised]
    np.testing.assert_allclose(result["bn1"]["mean"], np.mean([m for m, _ in per_batch], axis=0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result["bn1"]["var"], np.mean([v for _, v in per_batch], axis=0),
                               rtol=1e-4, atol=1e-4)

    # A deeper layer sees train-mode (batch-normalised) activations: its input is the captured output
    # of the convolution before it, in a train-mode forward pass of the same batch.
    per_batch = []
    for images in standardised:
        _, captured = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                  images.astype(np.float32),
                                  train=True, mutable=["batch_stats", "intermediates"],
                                  capture_intermediates=True)
        conv_out = np.asarray(captured["intermediates"]["layer2_0"]["conv2"]["__call__"][0], np.float64)
        per_batch.append(_moments(conv_out))
    np.testing.assert_allclose(result["layer2_0"]["bn2"]["mean"], np.mean([m for m, _ in per_batch], axis=0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result["layer2_0"]["bn2"]["var"], np.mean([v for _, v in per_batch], axis=0),
                               rtol=1e-4, atol=1e-5)
    # The running statistics differ from these (init: mean 0, var 1), so the comparison is not vacuous.
    assert not np.allclose(result["bn1"]["mean"], state.batch_stats["bn1"]["mean"])


@pytest.mark.parametrize("norm", ["frozen", "group"])
def test_population_statistics_refuse_models_without_train_mode_batch_norm(norm):
    model = create_model("tiny", num_classes=2, norm=norm)
    assert not batch_stats.applies_to(model)
    with pytest.raises(ValueError, match=norm):
        batch_stats.population_statistics(None, model, [], sharding.make_mesh(), None)


def _example_ids(images: np.ndarray, split_images: np.ndarray) -> np.ndarray:
    """Each batch image's index in the split (the tiny images are all distinct)."""
    index = {hashlib.sha1(image.tobytes()).hexdigest(): i for i, image in enumerate(split_images)}
    return np.array([index[hashlib.sha1(image.tobytes()).hexdigest()] for image in images])


def _natural(images, step, num_batches=4, batch_size=32, **kwargs):
    return [b["image"] for b in input_pipeline.natural_batches(
        images, num_batches=num_batches, batch_size=batch_size, seed=0, step=step, **kwargs).as_numpy_iterator()]


def test_natural_batches_are_uniform_distinct_and_a_function_of_seed_and_step(tiny_data):
    images = tiny_data.splits["train"]["image"]
    assert len({image.tobytes() for image in images}) == len(images)
    first = [_example_ids(b, images) for b in _natural(images, step=7)]
    assert [len(set(ids)) for ids in first] == [32] * 4  # distinct within a batch
    again = [_example_ids(b, images) for b in _natural(images, step=7)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, [_example_ids(b, images) for b in _natural(images, step=8)])
    # Two processes' shares make up the global batch, in order.
    shares = [_natural(images, step=7, process_index=p, process_count=2) for p in (0, 1)]
    for k, batch in enumerate(_natural(images, step=7)):
        np.testing.assert_array_equal(np.concatenate([shares[0][k], shares[1][k]]), batch)
    # Uniform over the split, whatever the groups: 200 batches of 32 from 120 examples (53 draws each).
    ids = np.concatenate([_example_ids(b, images) for b in _natural(images, step=0, num_batches=200)])
    counts = np.bincount(ids, minlength=len(images))
    assert scipy_stats.chisquare(counts).pvalue > 1e-3


def _run(tiny_config, workdir, norm, precise_bn_batches):
    config = tiny_config()
    config.model.norm = norm
    config.training.precise_bn_batches = precise_bn_batches
    return config, registry.train(config, workdir)


@pytest.mark.slow
def test_precise_bn_leaves_frozen_batch_norm_runs_unchanged(tiny_config, tmp_path):
    """Frozen BatchNorm has no statistics to recompute (GroupNorm none at all: `applies_to` above)."""
    _, on = _run(tiny_config, tmp_path / "on", "frozen", 3)
    _, off = _run(tiny_config, tmp_path / "off", "frozen", 0)
    for a, b in zip(jax.tree.leaves((on.params, on.batch_stats)), jax.tree.leaves((off.params, off.batch_stats)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [run_log.read_metrics(tmp_path / name) for name in ("on", "off")]
    strip = [[{k: v for k, v in row.items() if k != "images_per_second"} for row in r] for r in rows]
    assert strip[0] == strip[1]


@pytest.mark.slow
def test_killed_and_resumed_run_with_precise_bn_equals_uninterrupted(tiny_config, tiny_data, tmp_path,
                                                                     monkeypatch):
    config, reference = _run(tiny_config, tmp_path / "reference", "shared", 2)
    # The returned state holds the statistics of the last step's natural batches under its parameters
    # (not the running averages, which would differ far beyond the tolerance).
    info = dataset.read_metadata(config.data.dir)
    batches = input_pipeline.natural_batches(
        tiny_data.splits["train"]["image"], num_batches=2, batch_size=config.data.eval_batch_size,
        seed=config.training.seed, step=config.training.steps).as_numpy_iterator()
    model = create_model("tiny", num_classes=2, norm="shared")
    mesh = sharding.make_mesh()
    expected = batch_stats.population_statistics(
        reference, model, batches, mesh, normalisation.Standardiser(info["channel_mean"], info["channel_std"], mesh))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(reference.batch_stats), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    real_make_train_step = kill_training_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        registry.train(config, tmp_path / "killed")
    monkeypatch.setattr(train_step, "make_train_step", real_make_train_step)
    resumed = registry.train(config, tmp_path / "killed")
    for a, b in zip(jax.tree.leaves((reference.params, reference.batch_stats)),
                    jax.tree.leaves((resumed.params, resumed.batch_stats)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = [[{k: v for k, v in row.items() if k != "images_per_second"} for row in run_log.read_metrics(path)]
             for path in (tmp_path / "reference", tmp_path / "killed")]
    assert strip[0] == strip[1]
    assert [row["step"] for row in strip[0] if row["split"] == "validation"] == [2, 4]
