"""The error-against-tissue-ratio plot's statistics: bin counts and exact binomial intervals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from gerne_jax.evaluation import reports


@pytest.mark.parametrize("count", [1, 2, 7, 44, 300])
def test_binomial_interval_is_scipys_exact_interval(count):
    wrong = np.arange(count + 1)
    low, high = reports.binomial_interval(wrong, np.full_like(wrong, count))
    for k in wrong:
        expected = stats.binomtest(int(k), count).proportion_ci(confidence_level=0.95, method="exact")
        assert low[k] == pytest.approx(expected.low, abs=1e-9)
        assert high[k] == pytest.approx(expected.high, abs=1e-9)
    assert np.all(low <= wrong / count) and np.all(wrong / count <= high)


def test_an_empty_bin_has_no_interval():
    low, high = reports.binomial_interval(np.array([0, 1]), np.array([0, 4]))
    assert np.isnan(low[0]) and np.isnan(high[0]) and 0 < high[1] < 1


def test_bin_counts_and_rates_against_numpy(tmp_path):
    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, 500)
    tissue_ratio = rng.random(500) ** 3  # most patches in the first bins, few in the last
    probabilities = rng.dirichlet([1, 1], 500)
    edges, counts, rates = reports.error_rate_by_tissue_ratio(label, probabilities, tissue_ratio)
    wrong = probabilities.argmax(axis=1) != label
    for y in (0, 1):
        mine = label == y
        expected_counts, _ = np.histogram(tissue_ratio[mine], bins=edges)
        expected_wrong, _ = np.histogram(tissue_ratio[mine & wrong], bins=edges)
        np.testing.assert_array_equal(counts[y], expected_counts)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(rates[y], expected_wrong / expected_counts)
    path = tmp_path / "error.png"
    reports.plot_error_by_tissue_ratio({"a": (label, probabilities, tissue_ratio),
                                        "b": (label, probabilities[:, ::-1], tissue_ratio)}, path, taus=[0.1])
    assert Image.open(path).size[0] > 0
