"""Data-parallel train step on 4 simulated CPU devices equals the single-device step.

XLA_FLAGS must be set before jax is imported, so the check runs in a fresh subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

NORMS = ("group", "shared", "separate")

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from gerne_jax import models, train_step as ts

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    n = 8  # 2 examples per device and batch
    batch = {"image": rng.normal(size=(2, n, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, size=(2, n)).astype(np.int32),
             "group": rng.integers(0, 4, size=(2, n)).astype(np.int32)}
    batch["image"][1] += 1.5  # batches with different statistics
    leaves = lambda tree: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    norm_of = lambda arrays: np.sqrt(sum(np.sum(a * a) for a in arrays))
    relative = lambda a, b: norm_of([x - y for x, y in zip(leaves(a), leaves(b))]) / norm_of(leaves(b))
    mesh = ts.make_mesh(4)
    results = {}
    for norm in sys.argv[1:]:
      model = models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock, num_filters=4,
                            num_classes=3, norm=norm)
      tx = ts.make_optimizer(0.5, momentum=0.9, weight_decay=0.01, beta=1.0)
      state = ts.create_train_state(jax.random.key(0), model, (1, 16, 16, 3), tx)
      single, _ = ts.make_train_step(model, learning_rate=0.5, beta=1.0)(state, batch)
      sharded_batch = ts.shard_batch(batch, mesh)
      sharded_step = ts.make_train_step(model, learning_rate=0.5, beta=1.0, mesh=mesh)
      replicated_state = ts.replicate(state, mesh)
      sharded, _ = sharded_step(replicated_state, sharded_batch)
      hlo = sharded_step.lower(replicated_state, sharded_batch).compile().as_text()
      update = lambda s: jax.tree.map(lambda new, old: new - old, s.params, state.params)
      results[norm] = {
          "batch_devices": len(sharded_batch["image"].sharding.device_set),
          "image_shard_shape": list(sharded_batch["image"].addressable_shards[0].data.shape),
          "params_replicated": all(x.sharding.is_fully_replicated
                                   for x in jax.tree.leaves(sharded.params)),
          "all_gathers": hlo.count("all-gather("),
          "params": relative(sharded.params, single.params),
          "update": relative(update(sharded), update(single)),
          "batch_stats": relative(sharded.batch_stats, single.batch_stats) if state.batch_stats
                         else 0.0,
      }
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def sharded_vs_single():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run([sys.executable, "-c", _SCRIPT, *NORMS], env=env,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("norm", NORMS)
def test_four_device_step_equals_single_device_step(sharded_vs_single, norm):
    result = sharded_vs_single[norm]
    assert result["batch_devices"] == 4
    assert result["image_shard_shape"] == [2, 2, 16, 16, 3]  # N split 4 ways, pairs kept together
    assert result["params_replicated"]
    assert result["all_gathers"] == 0  # truly data parallel: no device gathers the whole batch
    assert result["params"] < 1e-5
    assert result["update"] < 1e-4  # the step itself, not just the (mostly unchanged) parameters
    assert result["batch_stats"] < 1e-5
