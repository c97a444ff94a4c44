"""Tests of `extrapolate` and the GERNE optimiser against hand-derived formulas, numpy and jax.grad.

The formulas are docs/design.md §3's: g_ext = g_lb + beta (g_lb - g_b), the gradient of
(1 + beta) L_lb - beta L_b; the optimiser adds coupled weight decay and SGD with momentum, with the
learning rate and beta injected as hyperparameters (schedules evaluated at the update count).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gerne_jax.train.extrapolation import extrapolate, hyperparameters, make_optimizer


def _params(rng: np.random.Generator) -> dict[str, Any]:
    return {"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                      "bias": rng.normal(size=(2,)).astype(np.float32)},
            "scale": np.float32(rng.normal())}


def _like(rng: np.random.Generator, params: Any) -> Any:
    """A random gradient shaped like `params`."""
    return jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)


def _numpy_extrapolated(g_lb: Any, g_b: Any, beta: float) -> list[np.ndarray]:
    """g_lb + beta (g_lb - g_b) leaf by leaf, in float64."""
    return [np.asarray(lb, np.float64) + beta * (np.asarray(lb, np.float64) - np.asarray(b, np.float64))
            for lb, b in zip(jax.tree.leaves(g_lb), jax.tree.leaves(g_b))]


@pytest.mark.parametrize("beta", [-1.0, 0.0, 0.5, 1.0, 2.5])
def test_update_is_less_biased_plus_beta_times_difference(beta):
    rng = np.random.default_rng(0)
    params = _params(rng)
    g_lb, g_b = _like(rng, params), _like(rng, params)
    tx = extrapolate(beta)
    updates, state = tx.update(g_lb, tx.init(params), params, biased_updates=g_b)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for got, want, p in zip(jax.tree.leaves(updates), _numpy_extrapolated(g_lb, g_b, beta),
                            jax.tree.leaves(params)):
        assert np.shape(got) == np.shape(p)  # shaped like the input: no stacked pair axis
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert state == optax.EmptyState()


def test_beta_minus_one_gives_biased_and_zero_gives_less_biased_gradient():
    rng = np.random.default_rng(1)
    params = _params(rng)
    g_lb, g_b = _like(rng, params), _like(rng, params)
    erm, _ = extrapolate(-1.0).update(g_lb, optax.EmptyState(), params, biased_updates=g_b)
    resampling, _ = extrapolate(0.0).update(g_lb, optax.EmptyState(), biased_updates=g_b)
    for got_b, got_lb, b, lb in zip(jax.tree.leaves(erm), jax.tree.leaves(resampling),
                                    jax.tree.leaves(g_b), jax.tree.leaves(g_lb)):
        np.testing.assert_allclose(got_b, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got_lb, lb)


def test_without_biased_updates_the_gradient_passes_unchanged():
    """The folded step and single-batch methods hand in one gradient, already final."""
    rng = np.random.default_rng(2)
    params = _params(rng)
    gradient = _like(rng, params)
    updates, _ = jax.jit(extrapolate(1.7).update)(gradient, optax.EmptyState(), params)
    jax.tree.map(np.testing.assert_array_equal, updates, gradient)


def test_update_equals_gradient_of_combined_loss():
    """End to end: per-batch gradients -> extrapolate == jax.grad((1 + beta) L_lb - beta L_b)."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(2, 16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=(2, 16)))

    def loss(p, xb, yb):
        logits = jnp.tanh(xb @ p["w"] + p["b"]) * 3.0
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    beta = 1.3
    g_b, g_lb = jax.grad(loss)(params, x[0], y[0]), jax.grad(loss)(params, x[1], y[1])
    updates, _ = extrapolate(beta).update(g_lb, optax.EmptyState(), params, biased_updates=g_b)
    expected = jax.grad(lambda p: (1 + beta) * loss(p, x[1], y[1]) - beta * loss(p, x[0], y[0]))(params)
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_optimizer_reads_schedules_at_the_update_count_and_uses_them():
    """`make_optimizer` with an lr schedule and a beta warm-up against hand-written SGD: coupled weight
    decay, momentum trace m = g + mu m, update -lr_t m; `hyperparams` after update t hold schedule(t)."""
    rng = np.random.default_rng(3)
    params = _params(rng)
    lr_schedule = optax.linear_schedule(0.2, 0.05, transition_steps=3)
    beta_schedule = optax.linear_schedule(0.0, 1.5, transition_steps=4)
    wd, momentum = 0.01, 0.9
    tx = make_optimizer(lr_schedule, beta_schedule, momentum=momentum, weight_decay=wd)
    state = tx.init(params)  # init takes the plain parameters
    update = jax.jit(tx.update)
    trace = [np.zeros(np.shape(p)) for p in jax.tree.leaves(params)]
    for t in range(6):
        lr_t = 0.2 + (0.05 - 0.2) * min(t, 3) / 3
        beta_t = 1.5 * min(t, 4) / 4
        g_lb, g_b = _like(rng, params), _like(rng, params)
        updates, state = update(g_lb, state, params, biased_updates=g_b)
        hyper = hyperparameters(state)
        assert float(hyper["learning_rate"]) == pytest.approx(lr_t, rel=1e-6)
        assert float(hyper["beta"]) == pytest.approx(beta_t, rel=1e-6, abs=1e-7)
        g_ext = _numpy_extrapolated(g_lb, g_b, beta_t)
        trace = [g + wd * np.asarray(p, np.float64) + momentum * m
                 for g, p, m in zip(g_ext, jax.tree.leaves(params), trace)]
        for got, m, p in zip(jax.tree.leaves(updates), trace, jax.tree.leaves(params), strict=True):
            assert np.shape(got) == np.shape(p)
            np.testing.assert_allclose(got, -lr_t * m, rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("k", [2, 3])
def test_multisteps_after_extrapolate_accumulates_the_extrapolated_gradient(k):
    """By linearity, k accumulated mini-steps equal one step on the mean g_lb and the mean g_b."""
    rng = np.random.default_rng(4)
    params = _params(rng)
    beta, lr = 0.7, 0.1
    accumulating = optax.chain(
        extrapolate(beta), optax.MultiSteps(optax.sgd(lr), every_k_schedule=k).gradient_transformation())
    state = accumulating.init(params)
    g_lbs = [_like(rng, params) for _ in range(k)]
    g_bs = [_like(rng, params) for _ in range(k)]
    for i, (g_lb, g_b) in enumerate(zip(g_lbs, g_bs)):
        updates, state = accumulating.update(g_lb, state, params, biased_updates=g_b)
        if i < k - 1:  # MultiSteps holds back the update until the k-th mini-step
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    mean = lambda trees: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)
    one_step = optax.chain(extrapolate(beta), optax.sgd(lr))
    expected, _ = one_step.update(mean(g_lbs), one_step.init(params), params, biased_updates=mean(g_bs))
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_clip_by_global_norm_after_extrapolate_clips_the_extrapolated_gradient(max_norm):
    rng = np.random.default_rng(6)
    params = _params(rng)
    g_lb, g_b = _like(rng, params), _like(rng, params)
    beta = 1.2
    tx = optax.chain(extrapolate(beta), optax.clip_by_global_norm(max_norm))
    updates, _ = tx.update(g_lb, tx.init(params), params, biased_updates=g_b)
    g_ext = _numpy_extrapolated(g_lb, g_b, beta)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in g_ext))
    scale = min(1.0, max_norm / norm)
    for got, want in zip(jax.tree.leaves(updates), g_ext, strict=True):
        np.testing.assert_allclose(got, scale * want, rtol=1e-5, atol=1e-7)
    got_norm = np.sqrt(sum(np.sum(np.asarray(u, np.float64) ** 2) for u in jax.tree.leaves(updates)))
    assert got_norm == pytest.approx(min(norm, max_norm), rel=1e-5)
