"""GroupDRO: the exponentiated-gradient group weights, the robust loss's gradient, and a run of train.py.

The weights are checked against the update written out by hand in numpy, the step's gradient against
`sum_g q_g grad L_g` with each group's gradient taken separately (docs/design.md §3, GroupDRO).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset
from gerne_jax.methods import group_dro, registry
from gerne_jax.models import factory, resnet
from gerne_jax.runs import run_log
from gerne_jax.train import extrapolation, train_state, train_step, trainer
from tests.helpers import REPO as ROOT
from tests.helpers import TINY_CHANNELS, restore_latest


def _hand_update(q, losses, present, eta, adjustment):
    """q_g exp(eta (L_g + adj_g)) for the groups present, q_g for the others, normalised."""
    new = np.array([qg * np.exp(eta * (lg + ag)) if p else qg
                    for qg, lg, p, ag in zip(q, losses, present, adjustment)])
    return new / new.sum()


def test_weight_moves_to_the_worst_group():
    q = np.full(4, 0.25)
    losses = np.array([0.2, 0.9, 2.5, 0.4])  # group 2 is the worst
    adjustment = group_dro.adjustments(np.array([[400, 25], [9, 100]]), 1.0)
    np.testing.assert_allclose(adjustment, [1 / 20, 1 / 5, 1 / 3, 1 / 10], rtol=1e-6)
    present = np.array([True, True, True, False])
    new = np.asarray(group_dro.update_group_weights(jnp.asarray(q), jnp.asarray(losses), jnp.asarray(present),
                                                    0.5, jnp.asarray(adjustment)))
    np.testing.assert_allclose(new, _hand_update(q, losses, present, 0.5, adjustment), rtol=1e-5)
    assert np.argmax(new) == 2 and new[2] > q[2] and np.isclose(new.sum(), 1.0)
    # Repeated with the same losses, the weight concentrates on the worst group.
    weights = jnp.asarray(q)
    for _ in range(200):
        weights = group_dro.update_group_weights(weights, jnp.asarray(losses), jnp.ones(4, bool), 0.1)
    assert float(weights[2]) > 0.999
    # eta = 0 keeps the weights.
    np.testing.assert_allclose(group_dro.update_group_weights(jnp.asarray(q), jnp.asarray(losses),
                                                              jnp.ones(4, bool), 0.0), q, rtol=1e-6)


def _prepared(config, label, attribute):
    """The configured method prepared on a training split with these labels and attribute bins."""
    method = registry.create(config)
    method.prepare({"label": label}, attribute, trainer.Context(config, {}, None))
    return method


def _config(eta=0.3, adjustment=0.5):
    from configs import tiny

    config = tiny.get_config("group_dro")
    config.data.taus = (0.1,)
    config.method.group_dro.eta, config.method.group_dro.adjustment = eta, adjustment
    config.optimizer.momentum, config.optimizer.weight_decay = 0.0, 0.0
    return config


@pytest.mark.slow
def test_step_gradient_is_that_of_the_weighted_group_losses():
    config = _config()
    rng = np.random.default_rng(1)
    label = np.repeat([0, 1], 30)
    attribute = np.tile(np.repeat([0, 1], [10, 5]), 4)
    method = _prepared(config, label, attribute)
    assert method.rows == (1,) and method.uses_groups

    model = resnet.create_model("tiny", num_classes=2, norm="group")
    mesh = sharding.make_mesh(1)
    learning_rate = config.optimizer.learning_rate
    # 16 pixels: on 8 the tiny ResNet's GroupNorm sees 1 x 1 maps of one channel per group (zero output).
    shape = (1, 16, 16, len(TINY_CHANNELS))
    state = train_state.create_train_state(jax.random.key(0), model, shape, method.optimizer())
    q0 = np.array([0.1, 0.2, 0.3, 0.4], np.float32)  # a non-uniform starting point, as mid-run
    state = state.replace(opt_state=(group_dro.GroupWeightsState(jnp.asarray(q0)), state.opt_state[1]))
    n = 12
    images = rng.normal(size=(1, n, *shape[1:])).astype(np.float32)
    labels = rng.integers(0, 2, size=(1, n)).astype(np.int32)
    groups = (labels * 2 + rng.integers(0, 2, size=(1, n))).astype(np.int32)
    groups[0, :4] = [0, 1, 2, 3]
    labels[0, :4] = [0, 0, 1, 1]
    groups[0, 4:] = np.where(groups[0, 4:] == 3, 2, groups[0, 4:])  # group 3 holds one example
    params = jax.tree.map(np.asarray, state.params)

    # Independent: each group's mean cross-entropy and its gradient, one group at a time.
    def group_loss(p, g):
        logits = model.apply({"params": p}, images[0], train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[0])
        return jnp.sum(jnp.where(groups[0] == g, ce, 0.0)) / np.sum(groups[0] == g)

    def all_group_losses(p):
        return jnp.stack([group_loss(p, g) for g in range(4)])

    # The losses [4] and, per parameter leaf, [4, ...]: each group's gradient.
    losses, jacobian = jax.jit(lambda p: (all_group_losses(p), jax.jacrev(all_group_losses)(p)))(params)
    losses = np.asarray(losses)
    counts = dataset.group_counts(label, attribute, 2, 2)
    q = _hand_update(q0, losses, np.ones(4, bool), 0.3, 0.5 / np.sqrt(counts.ravel()))
    scale = 0.5  # the loss divided by K = 2 (method.divide_loss_by_num_classes)
    expected = jax.tree.map(lambda j: scale * np.tensordot(q, np.asarray(j), axes=1), jacobian)

    step = train_step.make_train_step(model, mesh, method.gradients(), rows=1, with_groups=True)
    batch = sharding.shard_batch({"image": images, "label": labels, "group": groups}, mesh)
    new_state, metrics = step(state, batch)
    got = jax.tree.map(lambda before, after: (before - np.asarray(after)) / learning_rate, params,
                       new_state.params)
    assert float(optax.tree.norm(expected)) > 0.1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(group_dro.group_weights(new_state.opt_state), q, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), scale * np.dot(q, losses), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["worst_group_loss"]), losses.max(), rtol=1e-5)


def test_group_dro_config_errors_name_the_key():
    label, attribute = np.repeat([0, 1], 8), np.tile([0, 1], 8)
    for key, value in [("sampling", "uniform"), ("eta", -1.0), ("adjustment", float("nan"))]:
        config = _config()
        config.method.group_dro[key] = value
        with pytest.raises(ConfigError, match=f"method.group_dro.{key}"):
            _prepared(config, label, attribute)
    config = _config()
    config.method.group_dro.sampling = "natural"
    assert _prepared(config, label, attribute).rows == (0,)


@pytest.mark.slow
def test_group_dro_trains_end_to_end_through_train_py(tiny_data, tmp_path):
    workdir = tmp_path / "group_dro"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:group_dro",
         f"--config.data.dir={tiny_data.path}", "--config.method.group_dro.eta=1.0",
         "--config.model.norm=shared",  # GroupNorm's output vanishes on the tiny 8-pixel patches
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = run_log.read_config(workdir)
    assert config.method.name == "group_dro"
    train_rows = run_log.rows_of(run_log.read_metrics(workdir), "train")
    assert [row["step"] for row in train_rows] == list(range(1, config.training.steps + 1))
    for row in train_rows:
        weights = [value for key, value in row.items() if key.startswith("group_weight/")]
        assert len(weights) == 4 and np.isclose(sum(weights), 1.0, atol=1e-5)
        assert np.isfinite(row["loss"])
    # Group-balanced batches: every group's loss enters, and the weights have moved off uniform.
    assert not np.allclose(weights, 0.25)
    # The checkpoint holds the group weights of its step (a resumed run continues with them).
    # (The resume target: the common optimiser after GroupDRO's link over the K * A = 4 groups.)
    optimizer = optax.chain(group_dro.track_group_weights(4), extrapolation.optimizer_from_config(
        config.optimizer, config.training.steps, extrapolation.beta_schedule(config.method)))
    target = train_state.abstract_state(factory.create_model(config.model), optimizer, (8, 8, len(TINY_CHANNELS)),
                                        sharding.make_mesh(), config.training.seed)
    state, meta = restore_latest(workdir, target)
    assert meta["step"] == config.training.steps
    np.testing.assert_allclose(group_dro.group_weights(state.opt_state), weights, rtol=1e-6)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from configs import tiny
    from gerne_jax.methods import group_dro, registry
    from gerne_jax.models import resnet
    from gerne_jax.core import sharding
    from gerne_jax.train import train_state, train_step, trainer

    assert len(jax.devices()) == 4, jax.devices()
    config = tiny.get_config("group_dro")
    config.method.group_dro.eta, config.method.group_dro.adjustment = 2.0, 1.0
    method = registry.create(config)
    method.prepare({"label": np.repeat([0, 1], 20)}, np.tile([0, 0, 1, 1], 10), trainer.Context(config, {}, None))
    model = resnet.create_model("tiny", num_classes=2, norm="group")
    rng = np.random.default_rng(0)
    n = 8  # 2 per device; groups spread unevenly over the devices
    batch = {"image": rng.normal(size=(1, n, 16, 16, 3)).astype(np.float32),
             "label": np.array([[0, 0, 0, 0, 0, 1, 1, 1]], np.int32),
             "group": np.array([[0, 0, 0, 1, 1, 2, 3, 3]], np.int32)}
    state = train_state.create_train_state(jax.random.key(0), model, (1, 16, 16, 3), method.optimizer())
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the steps donate their state
    results = []
    for devices in (1, 4):
        mesh = sharding.make_mesh(devices)
        step = train_step.make_train_step(model, mesh, method.gradients(), rows=1, with_groups=True)
        new, metrics = step(sharding.replicate(copy(state), mesh), sharding.shard_batch(batch, mesh))
        results.append([np.asarray(group_dro.group_weights(new.opt_state)).tolist(), float(metrics["loss"]),
                        [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(new.params)]])
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_sharded_step_sums_group_losses_over_devices():
    """On 4 simulated devices the group losses (hence q, the loss and the update) are the global ones."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (q1, loss1, params1), (q4, loss4, params4) = json.loads(result.stdout.strip().splitlines()[-1])
    assert not np.allclose(q1, 0.25)
    np.testing.assert_allclose(q4, q1, rtol=1e-5)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for a, b in zip(params4, params1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
