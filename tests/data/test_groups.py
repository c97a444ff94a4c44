"""Tests of the groups and the batch plan against brute-force references and docs/design.md §3's formulas.

The group definitions (attribute bins, group ids and counts, largest-remainder rounding) live in
`gerne_jax.data.dataset`, the alpha table, beta_max and the batch plan in `gerne_jax.data.groups`.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from gerne_jax.data import dataset, groups


def brute_force_rounding(quotas: np.ndarray, total: int) -> np.ndarray:
    """The integer vector summing to `total` closest (L2) to `quotas`, by enumerating all of them."""
    best, best_error = None, np.inf
    for head in itertools.product(range(total + 1), repeat=len(quotas) - 1):
        if sum(head) > total:
            continue
        counts = np.array([*head, total - sum(head)])
        error = np.sum((counts - quotas) ** 2)
        if error < best_error - 1e-12:
            best, best_error = counts, error
    return best


def p_ext(alpha: np.ndarray, c: float, beta: float, targets: np.ndarray) -> np.ndarray:
    """docs/design.md §3's extrapolated sampling weights `alpha + c (beta + 1) (u - alpha)`."""
    return alpha + c * (beta + 1) * (targets - alpha)


def test_attribute_from_tissue_ratio_counts_thresholds_reached():
    rng = np.random.default_rng(0)
    taus = [0.03, 0.1, 0.2]
    ratio = np.concatenate([rng.uniform(0, 1, 500), taus, [0.0, 1.0]])
    expected = np.array([sum(r >= tau for tau in taus) for r in ratio])
    np.testing.assert_array_equal(dataset.attribute_from_tissue_ratio(ratio, taus), expected)
    np.testing.assert_array_equal(dataset.attribute_from_tissue_ratio([0.099, 0.1], [0.1]), [0, 1])


@pytest.mark.parametrize("taus", [[0.2, 0.1], [0.1, 0.1], [], [np.nan]])
def test_attribute_from_tissue_ratio_rejects_bad_thresholds(taus):
    with pytest.raises(ValueError, match="taus"):
        dataset.attribute_from_tissue_ratio([0.5], taus)


def test_group_counts_and_alpha_match_loops():
    rng = np.random.default_rng(1)
    label, attribute = rng.integers(0, 3, 400), rng.integers(0, 4, 400)
    counts = dataset.group_counts(label, attribute, 3, 4)
    ids = dataset.group_ids(label, attribute, 3, 4)
    for y in range(3):
        for a in range(4):
            members = (label == y) & (attribute == a)
            assert counts[y, a] == members.sum()
            assert np.all(ids[members] == y * 4 + a)
            assert groups.alpha_table(counts)[y, a] == pytest.approx(members.sum() / (label == y).sum())


def test_group_ids_names_the_bad_example():
    with pytest.raises(ValueError, match="attribute must lie in \\[0, 1\\]; example 2 has 2"):
        dataset.group_ids(np.array([0, 1, 1]), np.array([0, 1, 2]), 2, 2)
    with pytest.raises(ValueError, match="integers"):
        dataset.group_ids(np.array([0, 1]), np.array([0.0, 1.0]), 2, 2)


def test_largest_remainder_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(60):
        bins = int(rng.integers(2, 5))
        total = bins * int(rng.integers(1, 5))
        shares = rng.dirichlet(np.full(bins, 0.5))
        counts = dataset.largest_remainder(shares, total)[0]
        np.testing.assert_array_equal(counts, brute_force_rounding(shares * total, total))
        assert counts.sum() == total


def test_largest_remainder_rows_sum_exactly_with_awkward_shares():
    shares = np.array([[1 / 3, 1 / 3, 1 / 3], [0.1, 0.7, 0.2], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    counts = dataset.largest_remainder(shares, 10)
    np.testing.assert_array_equal(counts.sum(axis=1), 10)
    assert np.all(np.abs(counts - shares * 10) < 1)
    np.testing.assert_array_equal(counts[1:], [[1, 7, 2], [10, 0, 0], [3, 3, 4]])


def test_beta_max_design_example():
    alpha = np.array([[0.995] + [0.005 / 9] * 9])
    assert groups.beta_max(alpha, 0.5) == pytest.approx(0.995 / (0.5 * (0.995 - 0.1)) - 1)
    assert groups.beta_max(alpha, 0.5) == pytest.approx(1.22, abs=0.005)


@pytest.mark.parametrize("empty_group", ["error", "drop"])
def test_beta_max_is_where_some_p_ext_turns_negative(empty_group):
    rng = np.random.default_rng(3)
    for _ in range(50):
        counts = rng.integers(1, 500, size=(2, int(rng.integers(2, 5))))
        if empty_group == "drop":
            counts[0, 0] = 0
        c = float(rng.uniform(0.05, 1.0))
        alpha = groups.alpha_table(counts)
        targets = groups.uniform_targets(counts, empty_group)
        upper = groups.beta_max(alpha, c, targets)
        assert np.all(p_ext(alpha, c, upper, targets) >= -1e-12)
        assert np.any(p_ext(alpha, c, upper + 1e-6, targets) < 0)


def test_beta_max_infinite_when_alpha_is_uniform():
    assert groups.beta_max(np.full((2, 4), 0.25), 0.5) == np.inf


def test_uniform_targets_drop_uses_non_empty_bins():
    counts = np.array([[0, 5, 7], [1, 2, 3]])
    np.testing.assert_allclose(groups.uniform_targets(counts, "drop"), [[0, 0.5, 0.5], [1 / 3] * 3])
    np.testing.assert_allclose(groups.uniform_targets(counts, "error"), np.full((2, 3), 1 / 3))


@pytest.mark.parametrize("corr", [0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 1.0])
def test_window_sizes_equal_counts_follow_official_formula(corr):
    sizes = np.arange(1, 80)
    expected = [round(b * (2 - corr)) for b in sizes]
    np.testing.assert_array_equal(groups.overlap_window_sizes(sizes, sizes, corr), expected)


def test_window_sizes_unequal_counts_share_corr_of_the_smaller():
    n_b, n_lb = np.array([10, 3, 0, 7]), np.array([4, 9, 5, 0])
    windows = groups.overlap_window_sizes(n_b, n_lb, 0.5)
    np.testing.assert_array_equal(windows, [12, 10, 5, 7])  # 10+4-2, 3+9-round(1.5), 5, 7
    np.testing.assert_array_equal(groups.overlap_window_sizes(n_b, n_lb, 0.0), n_b + n_lb)
    np.testing.assert_array_equal(groups.overlap_window_sizes(n_b, n_lb, 1.0), np.maximum(n_b, n_lb))


def test_batch_plan_counts_follow_design_shares():
    rng = np.random.default_rng(4)
    for _ in range(20):
        counts = rng.integers(1, 1000, size=(2, 3))
        c, batch_per_group = float(rng.uniform(0.1, 1)), int(rng.integers(1, 6))
        plan = groups.make_batch_plan(counts, c=c, beta=0.0, batch_per_group=batch_per_group)
        total = 3 * batch_per_group
        alpha = counts / counts.sum(axis=1, keepdims=True)
        for y in range(2):
            np.testing.assert_array_equal(plan.biased_counts[y], brute_force_rounding(alpha[y] * total, total))
            lb_quota = ((1 - c) * alpha[y] + c / 3) * total
            np.testing.assert_array_equal(plan.less_biased_counts[y], brute_force_rounding(lb_quota, total))
        assert plan.batch_size == 2 * 3 * batch_per_group
        np.testing.assert_allclose(plan.group_weights, plan.less_biased_counts / plan.batch_size)


def test_batch_plan_group_weights_are_the_extrapolated_loss_weights():
    plan = groups.make_batch_plan(np.array([[90, 10], [30, 70]]), c=0.5, beta=1.0, batch_per_group=10)
    # biased rows: [18, 2], [6, 14]; less-biased rows: (0.5 alpha + 0.25) * 20 = [14, 6], [8, 12]
    np.testing.assert_array_equal(plan.biased_counts, [[18, 2], [6, 14]])
    np.testing.assert_array_equal(plan.less_biased_counts, [[14, 6], [8, 12]])
    np.testing.assert_allclose(plan.group_weights, (2 * plan.less_biased_counts - plan.biased_counts) / 40)
    assert plan.group_weights.sum() == pytest.approx(1.0)


def test_beta_outside_range_prints_alpha_table_and_range():
    counts = np.array([[950, 50], [100, 900]])
    upper = 0.95 / (0.5 * (0.95 - 0.5)) - 1
    with pytest.raises(ValueError) as error:
        groups.make_batch_plan(counts, c=0.5, beta=upper + 0.01, batch_per_group=8,
                               class_names=["non_tumour", "tumour"], bin_names=dataset.tissue_bin_names([0.1]))
    message = str(error.value)
    assert "beta_max" in message and f"[-1, {upper:.6g}]" in message
    assert "alpha[y, a]" in message and "0.9500 (950)" in message and "r >= 0.1" in message
    with pytest.raises(ValueError, match="outside"):
        groups.make_batch_plan(counts, c=0.5, beta=-1.01, batch_per_group=8)
    groups.make_batch_plan(counts, c=0.5, beta=-1.0, batch_per_group=8)
    with pytest.raises(ValueError, match="outside"):           # uniform alpha: beta_max = inf
        groups.make_batch_plan(np.array([[5, 5], [5, 5]]), c=0.5, beta=np.inf, batch_per_group=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(c=0.0), "c = 0.0 must lie in"), (dict(c=1.5), "c = 1.5 must lie in"),
    (dict(corr=1.2), "corr"), (dict(batch_per_group=0), "batch_per_group"),
    (dict(empty_group="ignore"), "empty_group"),
])
def test_bad_config_values_are_named(kwargs, match):
    config = dict(c=0.5, beta=1.0, batch_per_group=4) | kwargs
    with pytest.raises(ValueError, match=match) as error:
        groups.make_batch_plan(np.array([[60, 40], [20, 80]]), **config)
    assert "alpha[y, a]" in str(error.value)


def test_empty_class_is_an_error():
    with pytest.raises(ValueError, match="class tumour has no training examples"):
        groups.make_batch_plan(np.array([[5, 5], [0, 0]]), c=0.5, beta=0.0, batch_per_group=2,
                               class_names=["non_tumour", "tumour"])


def test_empty_group_error_or_drop():
    counts = np.array([[40, 60], [0, 100]])
    names = dict(class_names=["non_tumour", "tumour"], bin_names=["r < 0.1", "r >= 0.1"])
    with pytest.raises(ValueError, match=r"group \(tumour, r < 0.1\) has no training examples"):
        groups.make_batch_plan(counts, c=0.5, beta=1.0, batch_per_group=4, **names)
    plan = groups.make_batch_plan(counts, c=0.5, beta=1.0, batch_per_group=4, empty_group="drop", **names)
    np.testing.assert_array_equal(plan.biased_counts[1], [0, 8])
    np.testing.assert_array_equal(plan.less_biased_counts[1], [0, 8])  # c / A_y with A_y = 1
    np.testing.assert_array_equal(plan.less_biased_counts[0], [4, 4])  # 0.5 * [0.4, 0.6] + 0.25 -> [0.45, 0.55]
    np.testing.assert_array_equal(plan.window_sizes[1], [0, 12])
    assert "(tumour, r < 0.1)" in plan.describe()


def test_rounding_that_makes_a_group_weight_negative_is_refused():
    counts = np.array([[199, 1], [100, 100]])
    upper = 0.995 / (0.5 * (0.995 - 0.5)) - 1          # 3.0202
    # Biased row [64, 0]; less-biased quotas [47.84, 16.16] -> [48, 16]; weight of the first group
    # (1 + 3.01) * 48 - 3.01 * 64 < 0 although beta < beta_max.
    with pytest.raises(ValueError, match="negative weight once the batch counts are rounded"):
        groups.make_batch_plan(counts, c=0.5, beta=min(3.01, upper), batch_per_group=32)
    groups.make_batch_plan(counts, c=0.5, beta=2.9, batch_per_group=32)


def test_tissue_bin_names():
    assert dataset.tissue_bin_names([0.03, 0.1]) == ("r < 0.03", "0.03 <= r < 0.1", "r >= 0.1")
