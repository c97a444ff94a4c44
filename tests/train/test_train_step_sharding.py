"""Data parallelism on 4 simulated CPU devices: the sharded step equals the one-device step
(docs/design.md §7), with the default all-reduce and with the deterministic (device-ordered)
reduction, and `prefetch_to_mesh` places batches with the batch sharding.

XLA_FLAGS must be set before jax is imported, so the checks run in a fresh subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.methods import registry
from gerne_jax.models import resnet
from gerne_jax.train import train_step

pytestmark = pytest.mark.slow  # one subprocess compiling a dozen steps

NORMS = ("group", "shared", "separate")

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import optax
    from gerne_jax.train import extrapolation, train_state, train_step as ts
    from gerne_jax.methods import group_dro
    from gerne_jax.models import resnet
    from gerne_jax.core import sharding

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    n = 8  # 2 examples per device and batch
    batch = {"image": rng.normal(size=(2, n, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, size=(2, n)).astype(np.int32)}
    batch["image"][1] += 1.5  # batches with different statistics
    leaves = lambda tree: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    norm_of = lambda arrays: np.sqrt(sum(np.sum(a * a) for a in arrays))
    relative = lambda a, b: norm_of([x - y for x, y in zip(leaves(a), leaves(b))]) / norm_of(leaves(b))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the steps donate their state
    one_device, four_devices = sharding.make_mesh(1), sharding.make_mesh(4)
    results = {}
    # (name, norm, paired): the paired step per norm, and ERM's single-batch step.
    cases = [(norm, norm, True) for norm in sys.argv[1:]] + [("single-shared", "shared", False)]
    for name, norm, paired in cases:
      data = batch if paired else {key: value.reshape(1, 2 * n, *value.shape[2:])
                                   for key, value in batch.items()}
      model = resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4,
                            num_classes=3, norm=norm)
      tx = extrapolation.make_optimizer(0.5, 1.0, momentum=0.9, weight_decay=0.01)
      state = train_state.create_train_state(jax.random.key(0), model, (1, 16, 16, 3), tx)
      initial = jax.device_get(state)
      gradients, rows = (ts.two_gradients, 2) if paired else (ts.single_batch, 1)
      single, _ = ts.make_train_step(model, one_device, gradients, rows=rows)(
          sharding.replicate(copy(state), one_device), data)
      sharded_batch = sharding.shard_batch(data, four_devices)
      sharded_step = ts.make_train_step(model, four_devices, gradients, rows=rows)
      replicated_state = sharding.replicate(copy(state), four_devices)
      hlo = sharded_step.lower(replicated_state, sharded_batch).compile().as_text()
      sharded, _ = sharded_step(replicated_state, sharded_batch)
      update = lambda s: jax.tree.map(lambda new, old: new - old, s.params, initial.params)
      results[name] = {
          "batch_devices": len(sharded_batch["image"].sharding.device_set),
          "image_shard_shape": list(sharded_batch["image"].addressable_shards[0].data.shape),
          "params_replicated": all(x.sharding.is_fully_replicated
                                   for x in jax.tree.leaves(sharded.params)),
          "all_gathers": hlo.count("all-gather("),
          "params": relative(sharded.params, single.params),
          "update": relative(update(sharded), update(single)),
          "batch_stats": relative(sharded.batch_stats, single.batch_stats) if initial.batch_stats
                         else 0.0,
      }

    # The deterministic reduction (GroupNorm): single, paired, folded and GroupDRO's objective step on
    # 4 devices against the default step on one device; the same step run twice from the same state.
    groups = rng.integers(0, 4, size=(1, 2 * n)).astype(np.int32)
    dro = group_dro.RobustLoss(eta=0.5, adjustment=np.array([0.0, 0.1, 0.2, 0.3], np.float32),
                               group_names=["a", "b", "c", "d"])
    for name, paired, gradients, objective in [("single", False, ts.single_batch, None),
                                               ("paired", True, ts.two_gradients, None),
                                               ("folded", True, ts.folded(1.0), None),
                                               ("group_dro", False, ts.objective(dro), dro)]:
      data = batch if paired else {key: value.reshape(1, 2 * n, *value.shape[2:])
                                   for key, value in batch.items()}
      if objective is not None:
        data = {**data, "group": groups}
      model = resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4,
                            num_classes=3, norm="group")
      tx = extrapolation.make_optimizer(0.5, 1.0, momentum=0.9, weight_decay=0.01)
      if objective is not None:
        tx = optax.chain(group_dro.track_group_weights(4), tx)
      state = train_state.create_train_state(jax.random.key(0), model, (1, 16, 16, 3), tx)
      initial = jax.device_get(state)
      kwargs = {"rows": 2 if paired else 1, "with_groups": objective is not None}
      reference, reference_metrics = ts.make_train_step(model, one_device, gradients, **kwargs)(
          sharding.replicate(copy(state), one_device), data)
      step = ts.make_train_step(model, four_devices, gradients, deterministic_reduction=True, **kwargs)
      sharded_batch = sharding.shard_batch(data, four_devices)
      first, metrics = step(sharding.replicate(copy(state), four_devices), sharded_batch)
      second, _ = step(sharding.replicate(copy(state), four_devices), sharded_batch)
      update = lambda s: jax.tree.map(lambda new, old: new - old, s.params, initial.params)
      pairs = [(float(metrics[k]), float(reference_metrics[k])) for k in sorted(reference_metrics)
               if np.isfinite(reference_metrics[k])]
      results["deterministic-" + name] = {
          "params": relative(first.params, reference.params),
          "update": relative(update(first), update(reference)),
          "opt_state": relative(first.opt_state, reference.opt_state),
          "metrics": max(abs(a - b) / max(abs(b), 1.0) for a, b in pairs),
          "metric_names": sorted(metrics) == sorted(reference_metrics),
          "repeat_identical": all(np.array_equal(a, b) for a, b in zip(
              jax.tree.leaves(jax.device_get(first)), jax.tree.leaves(jax.device_get(second)))),
      }

    # prefetch_to_mesh: the same batches, in order, with at most `size` taken ahead of the consumer.
    source = [{"image": rng.normal(size=(2, n, 4, 4, 3)).astype(np.float32),
               "label": np.full((2, n), i, np.int32)} for i in range(5)]
    taken = []
    def produce():
      for b in source:
        taken.append(len(taken))
        yield b
    prefetched, taken_after = [], []
    for placed in sharding.prefetch_to_mesh(produce(), four_devices, size=2):
      prefetched.append(placed)
      taken_after.append(len(taken))
    expected = sharding.batch_sharding(four_devices)
    results["prefetch"] = {
        "count": len(prefetched),
        "equal": all(np.array_equal(np.asarray(p[key]), b[key])
                     for p, b in zip(prefetched, source) for key in b),
        "sharded": all(p[key].sharding == expected for p in prefetched for key in p),
        "taken_after": taken_after,
    }
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def four_device_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run([sys.executable, "-c", _SCRIPT, *NORMS], env=env,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [*NORMS, "single-shared"])
def test_four_device_step_equals_single_device_step(four_device_results, case):
    result = four_device_results[case]
    assert result["batch_devices"] == 4
    # N split 4 ways, the rows of a pair kept together: [2, 8 / 4, ...] paired, [1, 16 / 4, ...] single.
    expected_shape = [1, 4, 16, 16, 3] if case.startswith("single") else [2, 2, 16, 16, 3]
    assert result["image_shard_shape"] == expected_shape
    assert result["params_replicated"]
    assert result["all_gathers"] == 0  # truly data parallel: no device gathers the whole batch
    assert result["params"] < 1e-5
    assert result["update"] < 1e-4  # the step itself, not just the (mostly unchanged) parameters
    assert result["batch_stats"] < 1e-5


@pytest.mark.parametrize("case", ["single", "paired", "folded", "group_dro"])
def test_deterministic_reduction_computes_the_one_device_step_and_repeats_bit_for_bit(four_device_results, case):
    result = four_device_results["deterministic-" + case]
    assert result["params"] < 1e-5
    assert result["update"] < 1e-4
    assert result["opt_state"] < 1e-5  # momentum, and GroupDRO's group weights
    assert result["metric_names"] and result["metrics"] < 1e-5
    assert result["repeat_identical"]


@pytest.mark.parametrize("norm", ["shared", "separate"])
def test_deterministic_reduction_refuses_train_mode_batch_norm(norm):
    model = resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4, num_classes=3, norm=norm)
    with pytest.raises(ConfigError, match=f"mesh.deterministic_reduction = True .* model.norm = '{norm}'"):
        train_step.make_train_step(model, sharding.make_mesh(1), train_step.two_gradients, rows=2,
                                   deterministic_reduction=True)
    train_step.make_train_step(model, sharding.make_mesh(1), train_step.two_gradients, rows=2)  # the default: fine


def test_training_with_deterministic_reduction_and_batch_norm_stops_before_writing(tiny_config, tmp_path):
    config = tiny_config("gerne")
    config.model.norm, config.mesh.deterministic_reduction = "shared", True
    with pytest.raises(ConfigError, match="mesh.deterministic_reduction = True .* model.norm = 'shared'"):
        registry.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_prefetch_to_mesh_yields_the_batches_in_order_with_the_batch_sharding(four_device_results):
    result = four_device_results["prefetch"]
    assert result["count"] == 5 and result["equal"] and result["sharded"]
    # Two batches in flight: when the k-th batch is handed out, k + 1 have been taken (at most all 5).
    assert result["taken_after"] == [2, 3, 4, 5, 5]
