"""The comparison's statistics against scipy, tabulated quantiles and brute-force loops over slides."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import statistics
from gerne_jax.evaluation import metrics

T_975 = {4: 2.7764451, 2: 4.3026527}  # Student t quantiles from printed tables


@pytest.mark.parametrize("n", [5, 3])
def test_paired_difference_is_the_t_interval_and_scipy_paired_test(n):
    rng = np.random.default_rng(n)
    values, reference = rng.random(n), rng.random(n)
    result = statistics.paired_difference(values, reference)
    d = values - reference
    half = T_975[n - 1] * d.std(ddof=1) / np.sqrt(n)
    assert result["mean"] == pytest.approx(d.mean())
    assert (result["low"], result["high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-6)
    assert result["p"] == pytest.approx(scipy_stats.ttest_rel(values, reference).pvalue)
    assert result["n"] == n


def test_paired_difference_needs_two_seeds_and_handles_identical_runs():
    with pytest.raises(ValueError, match="two or more"):
        statistics.paired_difference([0.5], [0.4])
    same = statistics.paired_difference([0.5, 0.6], [0.5, 0.6])
    assert (same["mean"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)


def _patches(rng, n=400, slides=7):
    label = rng.integers(0, 2, n)
    group = 2 * label + rng.integers(0, 2, n)
    probability = np.clip(label * 0.6 + rng.random(n) * 0.5, 0, 1)
    probability[:5] = 0.5  # ties: the evaluator's argmax calls them non-tumour
    slide_id = np.array([f"s{i}" for i in rng.integers(0, slides, n)])
    return probability, label, group, slide_id


def test_group_counts_by_slide_match_a_loop_and_the_evaluators_wga():
    rng = np.random.default_rng(0)
    probability, label, group, slide_id = _patches(rng)
    slides = sorted(set(slide_id))
    correct, total = statistics.group_correct_by_slide(probability, label, group, slide_id, slides, 4)
    predicted = np.stack([1 - probability, probability], 1).argmax(1)
    for i, slide in enumerate(slides):
        for g in range(4):
            mine = (slide_id == slide) & (group == g)
            assert total[i, g] == mine.sum()
            assert correct[i, g] == np.sum(predicted[mine] == label[mine])
    report = metrics.classification_report(label, np.stack([1 - probability, probability], 1), group % 2, 2)
    assert statistics.worst_group_accuracy(correct.sum(0), total.sum(0)) == pytest.approx(
        report["worst_group_accuracy"])


def test_slide_bootstrap_equals_recomputing_wga_on_the_resampled_slides():
    rng = np.random.default_rng(1)
    runs = [_patches(rng) for _ in range(3)]
    slides = sorted(set(runs[0][3]) | set(runs[1][3]) | set(runs[2][3]))
    per_run = [statistics.group_correct_by_slide(p, y, g, s, slides, 4) for p, y, g, s in runs]
    replicates = statistics.slide_bootstrap(per_run, replicates=25, seed=3)
    weights = np.random.default_rng(3).multinomial(len(slides), np.full(len(slides), 1 / len(slides)), size=25)
    for r in range(25):
        drawn = np.repeat(np.arange(len(slides)), weights[r])  # the replicate's slides, with repeats
        wgas = []
        for probability, label, group, slide_id in runs:
            index = np.concatenate([np.flatnonzero(slide_id == slides[i]) for i in drawn])
            report = metrics.classification_report(label[index], np.stack([1 - probability, probability], 1)[index],
                                                   group[index] % 2, 2)
            wgas.append(report["worst_group_accuracy"])
        assert replicates[r] == pytest.approx(np.mean(wgas))
    low, high = statistics.percentile_interval(replicates)
    assert (low, high) == pytest.approx(tuple(np.percentile(replicates, [2.5, 97.5])))


def test_describe_difference_in_points():
    text = statistics.describe_difference({"mean": 0.0123, "low": -0.02, "high": 0.0446, "p": 0.456})
    assert text == "+1.2 [-2.0, +4.5] points, p = 0.46"
    small = statistics.describe_difference({"mean": 0.07, "low": 0.038, "high": 0.103, "p": 0.00234}, points=False)
    assert small == "+0.1 [+0.0, +0.1], p = 0.0023"
