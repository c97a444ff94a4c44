"""Tests of the extrapolate optax transformation against hand-derived formulas and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gerne_jax.extrapolation import ExtrapolateState, extrapolate


def _params(rng):
    return {"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                      "bias": rng.normal(size=(2,)).astype(np.float32)},
            "scale": np.float32(rng.normal())}


def _stacked(rng, params):
    return jax.tree.map(lambda p: rng.normal(size=(2, *np.shape(p))).astype(np.float32), params)


@pytest.mark.parametrize("beta", [-1.0, 0.0, 0.5, 1.0, 2.5])
def test_update_is_less_biased_plus_beta_times_difference(beta):
    rng = np.random.default_rng(0)
    params = _params(rng)
    stacked = _stacked(rng, params)
    tx = extrapolate(beta)
    updates, state = tx.update(stacked, tx.init(params), params)
    for got, g in zip(jax.tree.leaves(updates), jax.tree.leaves(stacked)):
        g_b, g_lb = np.asarray(g[0], np.float64), np.asarray(g[1], np.float64)
        np.testing.assert_allclose(got, g_lb + beta * (g_lb - g_b), rtol=1e-6, atol=1e-6)
    assert int(state.count) == 1


def test_beta_minus_one_gives_biased_and_zero_gives_less_biased_gradient():
    rng = np.random.default_rng(1)
    params = _params(rng)
    stacked = _stacked(rng, params)
    erm, _ = extrapolate(-1.0).update(stacked, ExtrapolateState(jnp.zeros([], jnp.int32)), params)
    resampling, _ = extrapolate(0.0).update(stacked, ExtrapolateState(jnp.zeros([], jnp.int32)))
    for b_leaf, lb_leaf, g in zip(jax.tree.leaves(erm), jax.tree.leaves(resampling),
                                  jax.tree.leaves(stacked)):
        np.testing.assert_allclose(b_leaf, g[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(lb_leaf, g[1])


def test_schedule_follows_step_count_under_jit():
    rng = np.random.default_rng(2)
    params = _params(rng)
    schedule = optax.linear_schedule(init_value=0.0, end_value=2.0, transition_steps=4)
    tx = extrapolate(schedule)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(6):
        stacked = _stacked(rng, params)
        updates, state = update(stacked, state, params)
        beta = min(step, 4) * 0.5
        g = stacked["dense"]["kernel"]
        np.testing.assert_allclose(updates["dense"]["kernel"], g[1] + beta * (g[1] - g[0]),
                                   rtol=1e-5, atol=1e-6)
    assert int(state.count) == 6


def test_chains_with_weight_decay_and_sgd_on_plain_params():
    rng = np.random.default_rng(3)
    params = _params(rng)
    beta, wd, lr, momentum = 1.5, 0.01, 0.1, 0.9
    tx = optax.chain(extrapolate(beta), optax.add_decayed_weights(wd), optax.sgd(lr, momentum))
    state = tx.init(params)  # init takes the ordinary parameters
    trace = jax.tree.map(np.zeros_like, params)
    for _ in range(3):
        stacked = _stacked(rng, params)
        updates, state = jax.jit(tx.update)(stacked, state, params)
        # Hand-written SGD with momentum on g_ext + wd * params (optax's trace: m = g + mu * m).
        g_ext = jax.tree.map(lambda g: g[1] + beta * (g[1] - g[0]), stacked)
        trace = jax.tree.map(lambda t, g, p: g + wd * p + momentum * t, trace, g_ext, params)
        for got, t, p in zip(jax.tree.leaves(updates), jax.tree.leaves(trace), jax.tree.leaves(params)):
            assert np.shape(got) == np.shape(p)
            np.testing.assert_allclose(got, -lr * t, rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)


def test_unstacked_gradients_are_rejected_with_the_leaf_named():
    rng = np.random.default_rng(4)
    params = _params(rng)
    tx = extrapolate(1.0)
    # The first leaf, ['dense']['bias'] of shape (2,), looks stacked; params show it is not.
    with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\] has shape \(2,\), expected \(2, 2\)"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\] has shape \(3, 2\)"):
        tx.update(params, tx.init(params))
    # A leading axis of 2 that is really the parameter's own axis is caught against params.
    square = {"w": np.ones((2, 5), np.float32)}
    with pytest.raises(ValueError, match="expected"):
        tx.update(square, tx.init(square), square)


def test_update_equals_gradient_of_combined_loss():
    """End to end: vmapped per-batch gradients -> extrapolate == jax.grad((1+b) L_lb - b L_b)."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(2, 16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=(2, 16)))

    def loss(p, xb, yb):
        logits = jnp.tanh(xb @ p["w"] + p["b"]) * 3.0
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    beta = 1.3
    stacked = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    tx = extrapolate(beta)
    updates, _ = tx.update(stacked, tx.init(params), params)
    expected = jax.grad(lambda p: (1 + beta) * loss(p, x[1], y[1]) - beta * loss(p, x[0], y[0]))(
        params)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
