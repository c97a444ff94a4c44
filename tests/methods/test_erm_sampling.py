"""ERM's three batch draws (`method.erm.sampling`): frequencies against the multinomial expectation,
class counts against the plan, independence from the attribute, and a run through the trainer."""
from __future__ import annotations

import numpy as np
import pytest

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset, groups, samplers
from gerne_jax.methods import erm, registry
from gerne_jax.runs import run_log
from gerne_jax.train import trainer

STEPS = 3000


def _toy(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.repeat([0, 1], [30, 12])
    attribute = (rng.random(label.size) < 0.2).astype(np.int64)
    attribute[[0, 1, 30, 31]] = [0, 1, 0, 1]  # every group non-empty
    return label, attribute


def test_natural_sampler_draws_every_example_equally_often_and_distinct_within_a_step():
    sampler = samplers.NaturalIndexSampler(num_examples=42, batch_size=12, seed=5)
    draws = np.stack([sampler(step) for step in range(STEPS)])
    assert draws.shape == (STEPS, 1, 12)
    assert all(np.unique(row).size == 12 for row in draws[:, 0])
    np.testing.assert_array_equal(sampler(17), sampler(17))
    counts = np.bincount(draws.ravel(), minlength=42)
    p = 12 / 42  # each example is in a step's batch with this probability
    expected, sigma = STEPS * p, np.sqrt(STEPS * p * (1 - p))
    assert np.all(np.abs(counts - expected) <= 5 * sigma)
    small = samplers.NaturalIndexSampler(num_examples=5, batch_size=12, seed=0)(3)[0]
    np.testing.assert_array_equal(np.sort(np.bincount(small, minlength=5)), [2, 2, 2, 3, 3])  # as even as can be


def _prepared(sampling: str, label: np.ndarray, attribute: np.ndarray, tiny_config) -> erm.Erm:
    config = tiny_config("erm")
    config.method.erm.sampling = sampling
    config.training.batch_per_group = 3
    method = erm.Erm()
    method.prepare({"label": label}, attribute, trainer.Context(config, {}, sharding.local_mesh()))
    return method


@pytest.mark.parametrize("sampling", ["class_balanced", "natural"])
def test_attribute_free_samplings_never_read_the_attribute(sampling, tiny_config):
    label, attribute = _toy()
    other = _prepared(sampling, label, 1 - attribute, tiny_config).sampler(seed=2)
    mine = _prepared(sampling, label, attribute, tiny_config).sampler(seed=2)
    for step in range(20):
        np.testing.assert_array_equal(mine(step), other(step))
    groups_run = _prepared("groups", label, attribute, tiny_config)
    assert not np.array_equal(groups_run.sampler(seed=2)(0), _prepared("groups", label, 1 - attribute,
                                                                          tiny_config).sampler(seed=2)(0))


def test_class_balanced_sampling_matches_group_shares_in_expectation(tiny_config):
    """Class counts per step are exactly the plan's; within a class, each member is equally likely, so
    each group's expected share is its training share alpha (the `groups` draw's, without strata)."""
    label, attribute = _toy()
    method = _prepared("class_balanced", label, attribute, tiny_config)
    plan = groups.make_batch_plan(dataset.group_counts(label, attribute, 2, 2), c=0.5, beta=0.0, batch_per_group=3)
    draws = np.stack([method.sampler(seed=1)(step) for step in range(STEPS)])[:, 0]
    assert draws.shape == (STEPS, plan.batch_size)
    for row in draws[:50]:
        np.testing.assert_array_equal(np.bincount(label[row], minlength=2), plan.biased_counts.sum(axis=1))
    for y in (0, 1):
        in_class = draws[label[draws] == y]
        share = np.mean(attribute[in_class] == 1)
        alpha = np.mean(attribute[label == y] == 1)
        n = in_class.size
        assert abs(share - alpha) <= 5 * np.sqrt(alpha * (1 - alpha) / n)


def test_natural_sampling_keeps_class_shares(tiny_config):
    label, attribute = _toy()
    method = _prepared("natural", label, attribute, tiny_config)
    draws = np.stack([method.sampler(seed=4)(step) for step in range(STEPS)])[:, 0]
    share, expected = np.mean(label[draws] == 1), np.mean(label == 1)
    assert abs(share - expected) <= 5 * np.sqrt(expected * (1 - expected) / draws.size)


def test_an_unknown_sampling_is_named(tiny_config):
    label, attribute = _toy()
    with pytest.raises(ConfigError, match="method.erm.sampling.*'stratified'"):
        _prepared("stratified", label, attribute, tiny_config)


@pytest.mark.parametrize("sampling", ["class_balanced", "natural"])
def test_erm_trains_with_each_sampling(sampling, tiny_config, tmp_path):
    config = tiny_config("erm")
    config.method.erm.sampling = sampling
    config.training.steps = 3
    registry.train(config, tmp_path / "run")
    assert run_log.is_finished(tmp_path / "run")
