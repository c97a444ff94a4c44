"""JTT: the error set against numpy's comparison of the identification model's predictions with the labels,
the upsampling frequencies against the binomial expectation, and both runs through the trainer and train.py.
"""
from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset, groups, samplers
from gerne_jax.methods import jtt, reference_run, registry
from gerne_jax.runs import run as run_lib
from gerne_jax.runs import run_log
from tests.helpers import REPO as ROOT

IDENTIFICATION_STEPS = 4


def test_upsampled_sampler_draws_error_examples_lambda_times_as_often():
    rng = np.random.default_rng(3)
    label = np.repeat([0, 1], [25, 15])
    attribute = rng.integers(0, 2, size=label.size)
    attribute[[0, 1, 25, 26]] = [0, 1, 0, 1]  # every group non-empty
    errors = rng.random(label.size) < 0.3
    upweight, steps = 4.0, 3000
    plan = groups.make_batch_plan(dataset.group_counts(label, attribute, 2, 2), c=0.5, beta=0.0, batch_per_group=3)
    sampler = samplers.UpsampledIndexSampler(plan, label, jtt.example_weights(errors, upweight), seed=7)
    draws = np.stack([sampler(step) for step in range(steps)])  # [steps, 1, N]
    assert draws.shape == (steps, 1, plan.batch_size)
    per_class = 2 * 3
    np.testing.assert_array_equal(np.bincount(label[draws[:, 0]].ravel(), minlength=2), [steps * per_class] * 2)
    np.testing.assert_array_equal(sampler(5), sampler(5))  # a pure function of (seed, step)

    counts = np.bincount(draws.ravel(), minlength=label.size)
    for y in (0, 1):
        members = label == y
        weights = np.where(errors, upweight, 1.0)[members]
        p = weights / weights.sum()
        n = steps * per_class
        expected, sigma = n * p, np.sqrt(n * p * (1 - p))
        assert np.all(np.abs(counts[members] - expected) <= 5 * sigma)
        # Pooled: the error examples' mean count over the others' is lambda, within 5 standard deviations.
        err, ok = errors[members], ~errors[members]
        c_err, c_ok = counts[members][err].sum(), counts[members][ok].sum()
        p_err = p[err].sum()
        ratio = (c_err / err.sum()) / (c_ok / ok.sum())
        relative_sd = np.sqrt((1 - p_err) / (n * p_err) + p_err / (n * (1 - p_err)))
        assert abs(ratio - upweight) <= 5 * relative_sd * upweight


def test_weights_refuse_lambda_below_one():
    with pytest.raises(ConfigError, match="method.jtt.upweight"):
        jtt.example_weights(np.array([True, False]), 0.5)
    np.testing.assert_array_equal(jtt.example_weights(np.array([True, False]), 6), [6.0, 1.0])


@pytest.fixture(scope="module")
def identification_run(tiny_config, tmp_path_factory):
    """An ERM run of T steps on the tiny data (BatchNorm: GroupNorm's output vanishes on 8-pixel patches)."""
    config = tiny_config("erm")
    config.model.norm = "shared"
    config.training.steps = IDENTIFICATION_STEPS
    workdir = tmp_path_factory.mktemp("jtt") / "identification"
    registry.train(config, workdir)
    return workdir, config


def _jtt_config(tiny_config, workdir):
    config = tiny_config("jtt")
    config.model.norm = "shared"
    config.method.jtt.identification_workdir = str(workdir)
    config.method.jtt.identification_step = IDENTIFICATION_STEPS
    config.method.jtt.upweight = 5.0
    return config


@pytest.mark.slow
def test_error_set_is_the_identification_models_mistakes(identification_run, tiny_config, tiny_data):
    workdir, erm_config = identification_run
    config = _jtt_config(tiny_config, workdir)
    from gerne_jax.data import input_pipeline

    train = input_pipeline.load_split(tiny_data.path, "train")
    metadata = dataset.read_metadata(tiny_data.path)
    mesh = sharding.make_mesh()
    errors = jtt.identification_errors(config, train, metadata, mesh)

    # Independent: the checkpoint of step T applied to the source arrays, normalised by hand.
    model, meta = run_lib.Run.open(workdir, mesh=mesh).restore_model(str(IDENTIFICATION_STEPS),
                                                                     train["image"].shape[1:], tiny_data.path)
    assert meta["step"] == IDENTIFICATION_STEPS
    source = tiny_data.splits["train"]
    images = (source["image"].astype(np.float32) - np.float32(metadata["channel_mean"])) / np.float32(
        metadata["channel_std"])
    logits = model.module.apply({"params": model.params, "batch_stats": model.batch_stats}, images, train=False)
    expected = np.argmax(np.asarray(jax.device_get(logits)), axis=-1) != source["label"]
    np.testing.assert_array_equal(errors, expected)
    assert 0 < expected.sum() < expected.size  # a set worth upweighting, neither empty nor everything

    # The cached probabilities (reference_run, shared with pseudo-groups) give the same error set.
    with np.load(reference_run.cache_file(workdir, str(IDENTIFICATION_STEPS), IDENTIFICATION_STEPS)) as stored:
        np.testing.assert_array_equal(np.argmax(stored["probabilities"], axis=-1) != source["label"], expected)
    np.testing.assert_array_equal(jtt.identification_errors(config, train, metadata, mesh), expected)


def test_missing_identification_run_is_named(tiny_config, tmp_path):
    config = _jtt_config(tiny_config, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="method.jtt.identification_workdir"):
        registry.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / run_log.CONFIG_FILE).exists()


@pytest.mark.slow
def test_jtt_trains_end_to_end_through_train_py(identification_run, tiny_data, tmp_path):
    workdir = tmp_path / "jtt"
    identification, _ = identification_run
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:jtt",
         f"--config.data.dir={tiny_data.path}", "--config.model.norm=shared",
         f"--config.method.jtt.identification_workdir={identification}",
         f"--config.method.jtt.identification_step={IDENTIFICATION_STEPS}", "--config.method.jtt.upweight=5",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "upweighted x 5" in result.stderr
    config = run_log.read_config(workdir)
    rows = run_log.read_metrics(workdir)
    assert [row["step"] for row in run_log.rows_of(rows, "train")] == list(range(1, config.training.steps + 1))
    assert all(np.isfinite(row["loss"]) for row in run_log.rows_of(rows, "train"))
    assert run_log.rows_of(rows, "validation")[-1]["step"] == config.training.steps
    assert reference_run.cache_file(identification, str(IDENTIFICATION_STEPS), IDENTIFICATION_STEPS).is_file()
