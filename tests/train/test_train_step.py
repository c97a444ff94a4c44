"""Tests of the train step: real steps per norm mode (docs/design.md §4) on tiny data, checked against
jax.grad of the combined loss computed independently with plain `model.apply` calls.

The step donates its state, so every test hands it a copy (`_copy`) of states it reads again.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from gerne_jax.core import sharding
from gerne_jax.evaluation import forward
from gerne_jax.methods import registry
from gerne_jax.models import resnet
from gerne_jax.train import extrapolation, train_state, trainer
from gerne_jax.train import train_step as ts

NUM_CLASSES, N, SIZE, CHANNELS = 3, 4, 16, 3
LR, BETA = 0.1, 1.0
# Each norm mode compiles its own steps and references (over 10 s on a CPU): "shared", the mode with
# the most machinery (one pass over both batches, a vmapped VJP, running statistics), runs in the
# quick selection (-m "not slow"), the others with the slow tests.
NORMS = [pytest.param(norm, marks=() if norm == "shared" else pytest.mark.slow) for norm in resnet.NORM_MODES]


def _model(norm: str, dtype: Any = jnp.float32) -> resnet.ResNet:
    """A one-block ResNet: the smallest model with every kind of layer the step handles (fast to
    compile; the full family is tested in test_models.py)."""
    return resnet.ResNet(stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4,
                         num_classes=NUM_CLASSES, norm=norm, dtype=dtype)


@functools.cache
def _mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(1)


def _copy(tree: Any) -> Any:
    """A copy to donate, so that the original stays readable."""
    return jax.tree.map(jnp.copy, tree)


def _paired_batch(seed: int = 0, offset: float = 2.0) -> dict[str, np.ndarray]:
    """Two batches with different means (the less-biased one is shifted by `offset`)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, N, SIZE, SIZE, CHANNELS)).astype(np.float32)
    images[1] += offset
    return {"image": images, "label": rng.integers(0, NUM_CLASSES, size=(2, N)).astype(np.int32)}


def _reference_loss(logits, labels):
    """Mean cross-entropy / K, written out independently of the step's loss."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)) / NUM_CLASSES


def _reference_logits(model, params, batch_stats, images):
    """Train-mode logits [2, N, K] for the model's norm mode from separate `model.apply` calls."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    if model.norm == "shared":  # one train-mode pass over the concatenation
        logits = model.apply(variables, jnp.concatenate(images), train=True,
                             mutable=["batch_stats"])[0]
        return logits.reshape(2, N, NUM_CLASSES)
    if model.norm == "separate":  # each batch alone through train-mode BatchNorm
        apply = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    else:
        apply = lambda x: model.apply(variables, x, train=True)
    return jnp.stack([apply(images[0]), apply(images[1])])


def _make_reference(model, batch_stats, batch):
    """Jitted params -> losses (L_b, L_lb), logits, g_b, g_lb and the gradient of the combined loss
    (1 + BETA) L_lb - BETA L_b, each by its own jax.grad."""
    images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])

    def losses(params):
        logits = _reference_logits(model, params, batch_stats, images)
        return _reference_loss(logits[0], labels[0]), _reference_loss(logits[1], labels[1])

    @jax.jit
    def reference(params):
        return dict(
            losses=losses(params), logits=_reference_logits(model, params, batch_stats, images),
            # jacrev: g_b and g_lb from one reverse pass vmapped over the two outputs.
            **dict(zip(("grad_b", "grad_lb"), jax.jacrev(losses)(params))),
            grad_combined=jax.grad(lambda p: (1 + BETA) * losses(p)[1] - BETA * losses(p)[0])(params))
    return reference


@functools.cache
def _initial_variables() -> dict[str, Any]:
    """One initialisation shared by all modes (BatchNorm and GroupNorm have the same parameters)."""
    return train_state.init_variables(jax.random.key(0), _model("frozen"), (1, SIZE, SIZE, CHANNELS))


def _state_for(model: resnet.ResNet, tx: optax.GradientTransformation) -> train_state.TrainState:
    initial = _copy(_initial_variables())
    batch_stats = initial["batch_stats"] if model.norm in resnet.BATCH_NORM_MODES else {}
    return train_state.TrainState.create(apply_fn=model.apply, params=initial["params"],
                                         batch_stats=batch_stats, tx=tx)


def _sgd(learning_rate=LR, beta=BETA) -> optax.GradientTransformationExtraArgs:
    """The GERNE optimiser reduced to plain SGD (no momentum, no weight decay)."""
    return extrapolation.make_optimizer(learning_rate, beta, momentum=0.0)


@functools.cache
def _run(norm: str) -> dict[str, Any]:
    """One two-gradient and one folded step from the same state, plus independent references."""
    model = _model(norm)
    batch = _paired_batch()
    state = _state_for(model, _sgd())
    new_state, metrics = ts.make_train_step(model, _mesh(), ts.two_gradients, rows=2)(_copy(state), batch)
    new_folded_state, folded_metrics = ts.make_train_step(model, _mesh(), ts.folded(BETA), rows=2)(
        _copy(state), batch)
    reference = _make_reference(model, state.batch_stats, batch)
    return dict(model=model, batch=batch, state=state, new_state=new_state, metrics=metrics,
                new_folded_state=new_folded_state, folded_metrics=folded_metrics,
                reference=reference, **reference(state.params))


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _global_norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("norm", NORMS)
def test_step_applies_gradient_of_combined_loss(norm):
    r = _run(norm)
    expected = jax.tree.map(lambda p, g: p - LR * g, r["state"].params, r["grad_combined"])
    _assert_trees_close(r["new_state"].params, expected)
    assert int(r["new_state"].step) == 1
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(r["new_state"].params))


@pytest.mark.parametrize("norm", NORMS)
def test_metrics_match_independent_per_batch_gradients(norm):
    r = _run(norm)
    m, batch = r["metrics"], r["batch"]
    np.testing.assert_allclose(m["loss_biased"], r["losses"][0], rtol=1e-5)
    np.testing.assert_allclose(m["loss_less_biased"], r["losses"][1], rtol=1e-5)
    norm_b, norm_lb = _global_norm(r["grad_b"]), _global_norm(r["grad_lb"])
    dot = sum(np.sum(np.asarray(x, np.float64) * np.asarray(y)) for x, y in
              zip(jax.tree.leaves(r["grad_b"]), jax.tree.leaves(r["grad_lb"])))
    np.testing.assert_allclose(m["grad_norm_biased"], norm_b, rtol=1e-4)
    np.testing.assert_allclose(m["grad_norm_less_biased"], norm_lb, rtol=1e-4)
    np.testing.assert_allclose(m["grad_cosine"], dot / (norm_b * norm_lb), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], _global_norm(r["grad_combined"]), rtol=1e-4)
    want = (np.argmax(r["logits"], -1) == batch["label"]).mean(axis=1)
    np.testing.assert_allclose([m["accuracy_biased"], m["accuracy_less_biased"]], want)
    assert float(m["learning_rate"]) == pytest.approx(LR) and float(m["beta"]) == BETA
    np.testing.assert_allclose(m["param_norm"], _global_norm(r["new_state"].params), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_folded_fast_path_equals_two_gradient_path(norm):
    r = _run(norm)
    _assert_trees_close(r["new_folded_state"].params, r["new_state"].params)
    _assert_trees_close(r["new_folded_state"].batch_stats, r["new_state"].batch_stats)
    for key in ("loss_biased", "loss_less_biased", "accuracy_biased", "accuracy_less_biased",
                "grad_norm", "learning_rate", "beta"):
        np.testing.assert_allclose(r["folded_metrics"][key], r["metrics"][key], rtol=1e-4)
    for key in ("grad_norm_biased", "grad_norm_less_biased", "grad_cosine"):
        assert np.isnan(r["folded_metrics"][key])


def _first_bn_input(params, images):
    """The stem conv output that the first BatchNorm (`bn1`) normalises, via a plain Conv."""
    conv = jax.jit(lambda x: jax.lax.conv_general_dilated(
        x, params["conv1"]["kernel"], (2, 2), [(3, 3), (3, 3)],
        dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return np.asarray(conv(images), np.float64)


@pytest.mark.slow
def test_frozen_leaves_batch_stats_unchanged():
    r = _run("frozen")
    _assert_trees_close(r["new_state"].batch_stats, r["state"].batch_stats, rtol=0, atol=0)


def test_shared_updates_running_statistics_once_from_both_batches():
    r = _run("shared")
    x = _first_bn_input(r["state"].params, np.concatenate(r["batch"]["image"]))
    old = r["state"].batch_stats["bn1"]
    new = r["new_state"].batch_stats["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * x.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * x.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_separate_normalises_each_batch_by_its_own_statistics():
    r, shared = _run("separate"), _run("shared")
    params = r["state"].params
    x = [_first_bn_input(params, images) for images in r["batch"]["image"]]
    old, new = r["state"].batch_stats["bn1"], r["new_state"].batch_stats["bn1"]
    # Running statistics: one update with the mean of the two batches' means and variances.
    mean_of_means = (x[0].mean(axis=(0, 1, 2)) + x[1].mean(axis=(0, 1, 2))) / 2
    mean_of_vars = (x[0].var(axis=(0, 1, 2)) + x[1].var(axis=(0, 1, 2))) / 2
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean_of_means, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * mean_of_vars, rtol=1e-4,
                               atol=1e-5)
    # The batches have different means, so pooled (shared) and per-batch statistics differ ...
    assert np.max(np.abs(new["var"] - shared["new_state"].batch_stats["bn1"]["var"])) > 1e-3
    # ... and so do the losses of the same samples under the two modes.
    assert abs(float(r["metrics"]["loss_biased"]) - float(shared["metrics"]["loss_biased"])) > 1e-4


def test_single_batch_erm_path():
    r = _run("shared")
    model, batch, state = r["model"], r["batch"], r["state"]
    images, labels = np.concatenate(batch["image"]), np.concatenate(batch["label"])
    single = {key: value.reshape(1, 2 * N, *value.shape[2:]) for key, value in batch.items()}
    new_state, metrics = ts.make_train_step(model, _mesh(), ts.single_batch, rows=1)(_copy(state), single)

    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits = model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
        return _reference_loss(logits, labels)

    value, grad = jax.jit(jax.value_and_grad(loss))(state.params)
    _assert_trees_close(new_state.params, jax.tree.map(lambda p, g: p - LR * g, state.params, grad))
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], _global_norm(grad), rtol=1e-4)
    np.testing.assert_allclose(metrics["param_norm"], _global_norm(new_state.params), rtol=1e-5)
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "param_norm", "learning_rate"}


def test_loss_not_divided_by_num_classes():
    r = _run("shared")
    step = ts.make_train_step(r["model"], _mesh(), ts.two_gradients, rows=2, divide_loss_by_num_classes=False)
    _, metrics = step(_copy(r["state"]), r["batch"])
    np.testing.assert_allclose([metrics["loss_biased"], metrics["loss_less_biased"]],
                               NUM_CLASSES * np.asarray(r["losses"]), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], NUM_CLASSES * _global_norm(r["grad_combined"]),
                               rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("norm", resnet.NORM_MODES)
def test_erm_resampling_and_schedules_are_configurations_of_the_step(norm):
    """A beta schedule -1, 0, BETA: ERM (g_b), resampling (g_lb), then GERNE, each step checked
    against the independent gradients at its own starting parameters; lr and beta come back from
    the optimiser state. So each per-batch gradient of the step (one pass per batch, or the vmapped
    VJP for shared statistics) equals its own reference, not only their combination."""
    r = _run(norm)
    beta_schedule = optax.join_schedules(
        [optax.constant_schedule(b) for b in (-1.0, 0.0, BETA)], boundaries=[1, 2])
    lr_schedule = optax.linear_schedule(0.2, 0.1, transition_steps=2)
    state = _state_for(r["model"], _sgd(lr_schedule, beta_schedule))
    step = ts.make_train_step(r["model"], _mesh(), ts.two_gradients, rows=2)
    for t, (beta, expected_grad) in enumerate([(-1.0, "grad_b"), (0.0, "grad_lb"),
                                               (BETA, "grad_combined")]):
        lr = 0.2 - 0.1 * t / 2
        reference = r["reference"](state.params)
        params = _copy(state.params)  # the step donates `state`
        state, metrics = step(state, r["batch"])
        assert float(metrics["beta"]) == pytest.approx(beta)
        assert float(metrics["learning_rate"]) == pytest.approx(lr)
        expected = jax.tree.map(lambda p, g, lr=lr: p - lr * g, params, reference[expected_grad])
        _assert_trees_close(state.params, expected)


@pytest.mark.slow
def test_folded_and_two_gradient_steps_report_the_same_beta_under_a_warm_up():
    """The method builds the folded loss weights and the optimiser from one beta schedule: both steps
    report beta(t) from the optimiser state and take the same updates while beta ramps up."""
    config = tiny.get_config("gerne")
    config.method.beta, config.method.beta_warmup_steps = 1.0, 3
    label, attribute = np.arange(40) % 2, (np.arange(40) // 4) % 2
    model, batch = _model("group"), _paired_batch()
    results = {}
    for fold in (False, True):
        config.method.fold_beta_into_loss = fold
        method = registry.create(config)
        method.prepare({"label": label}, attribute, trainer.Context(config, {}, None))
        step = ts.make_train_step(model, _mesh(), method.gradients(), rows=len(method.rows))
        state = _state_for(model, method.optimizer())
        betas = []
        for _ in range(5):
            state, metrics = step(state, batch)
            betas.append(float(metrics["beta"]))
        results[fold] = betas, state.params
    np.testing.assert_allclose(results[False][0], [0.0, 1 / 3, 2 / 3, 1.0, 1.0], rtol=1e-6)
    assert results[True][0] == results[False][0]
    _assert_trees_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)


def test_donated_state_is_consumed_and_repeated_steps_run():
    r = _run("shared")
    step = ts.make_train_step(r["model"], _mesh(), ts.two_gradients, rows=2)
    state = _copy(r["state"])
    for t in range(1, 4):
        # A device copy to compare with: a host view of the state's buffers (np.asarray on CPU) would
        # keep XLA from reusing them, and the step would silently copy instead of donating.
        previous, old = _copy(state.params), state
        state, metrics = step(state, r["batch"])
        assert int(state.step) == t and np.isfinite(float(metrics["loss_less_biased"]))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params))
        assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(state.params),
                                                        jax.tree.leaves(previous)))


def test_inputs_placed_on_the_mesh_give_the_same_step():
    r = _run("shared")
    mesh = _mesh()
    new_state, _ = ts.make_train_step(r["model"], mesh, ts.two_gradients, rows=2)(
        sharding.replicate(_copy(r["state"]), mesh), sharding.shard_batch(r["batch"], mesh))
    _assert_trees_close(new_state.params, r["new_state"].params, rtol=1e-6, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state():
    model = _model("group", jnp.bfloat16)
    state = _state_for(model, extrapolation.make_optimizer(LR, BETA))
    new_state, metrics = ts.make_train_step(model, _mesh(), ts.two_gradients, rows=2)(state, _paired_batch())
    for tree in (new_state.params, new_state.opt_state):
        assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(tree))
    assert np.isfinite(float(metrics["grad_norm"]))
    images = _paired_batch()["image"][0]
    probabilities = forward.probabilities(model, {"params": new_state.params, "batch_stats": new_state.batch_stats},
                                          images, jnp.zeros(images.shape[-1]), jnp.ones(images.shape[-1]))
    assert probabilities.dtype == jnp.float32


def test_bad_inputs_are_rejected():
    r = _run("shared")
    model, mesh, batch = r["model"], _mesh(), r["batch"]
    with pytest.raises(ValueError, match="rows must be 1 .* or 2"):
        ts.make_train_step(model, mesh, ts.folded(BETA), rows=3)
    with pytest.raises(ValueError, match="model.norm must be one of"):
        ts.make_train_step(model.clone(norm="batch"), mesh, ts.two_gradients, rows=2)
    step = ts.make_train_step(model, mesh, ts.two_gradients, rows=2)
    with pytest.raises(ValueError, match=r"\[2, N, H, W, C\]"):
        step(_copy(r["state"]), {**batch, "image": batch["image"][:1]})
    with pytest.raises(ValueError, match=r"batch\['label'\]"):
        step(_copy(r["state"]), {**batch, "label": batch["label"][:, :2]})
    single = ts.make_train_step(model, mesh, ts.single_batch, rows=1)
    with pytest.raises(ValueError, match=r"\[1, N, H, W, C\]"):
        single(_copy(r["state"]), batch)
    with pytest.raises(ValueError, match="num_devices"):
        sharding.make_mesh(len(jax.devices()) + 1)
    assert sharding.shard_batch(batch, mesh)["image"].shape == batch["image"].shape


def test_create_train_state_for_group_norm_has_no_batch_stats():
    model = _model("group")
    tx = extrapolation.make_optimizer(LR, BETA, weight_decay=0.01)
    state = jax.eval_shape(
        lambda key: train_state.create_train_state(key, model, (2, SIZE, SIZE, 5), tx), jax.random.key(0))
    assert state.batch_stats == {} and int(state.step.size) == 1
    assert state.params["conv1"]["kernel"].shape == (7, 7, 5, 4)
    with pytest.raises(ValueError, match="input_shape"):
        train_state.create_train_state(jax.random.key(0), model, (SIZE, SIZE, 5), tx)
