"""Tests of gerne_jax.slides.grid: patch origins, windowed counts, read blocks, low-res upsampling."""
from __future__ import annotations

import numpy as np
import pytest

from gerne_jax.slides import grid


@pytest.mark.parametrize("P, S, W", [(5, 5, 23), (5, 3, 23), (4, 7, 30), (6, 2, 6), (8, 4, 7)])
def test_window_counts_and_chunks_match_brute_force(P, S, W):
    band = np.random.default_rng(P * 100 + S).random((P, W)) < 0.3
    starts = grid.grid_origins(W, P, S)
    assert starts.tolist() == [x for x in range(0, W, S) if x + P <= W]
    np.testing.assert_array_equal(grid.window_counts(band, starts, P), [band[:, x:x + P].sum() for x in starts])
    for max_width in (1, P, P + S, 3 * P + 1, 10**6):
        chunks = grid.group_windows(starts, P, S, max_width)
        assert np.concatenate(chunks or [np.zeros(0, np.int64)]).tolist() == starts.tolist()
        assert all(c[-1] + P - c[0] <= max(max_width, P) for c in chunks)


@pytest.mark.parametrize("shape, P, S", [((50, 61), 8, 8), ((50, 61), 8, 5), ((40, 33), 6, 9), ((7, 30), 8, 8)])
@pytest.mark.parametrize("budget", [1, 8 * 8 * 3, 8 * 30 * 3, 30 * 61 * 3, 10**9])
def test_scan_plan_visits_every_position_in_row_major_order_within_budget(shape, P, S, budget):
    plan = grid.scan_plan(shape, P, S, 3, budget)
    visited = [(y, x) for ys, xs in plan for y in ys.tolist() for x in xs.tolist()]
    assert visited == [(y, x) for y in range(0, shape[0] - P + 1, S) for x in range(0, shape[1] - P + 1, S)]
    for ys, xs in plan:
        rows, cols = ys[-1] + P - ys[0], xs[-1] + P - xs[0]
        assert rows * cols * 3 <= budget or (len(ys) == 1 and len(xs) == 1), (ys, xs)
        assert len(ys) == 1 or S <= P


@pytest.mark.parametrize("y, x, h, w", [(3, 5, 17, 11), (0, 0, 24, 20), (16, 13, 9, 9), (21, 2, 1, 1)])
def test_lowres_window_is_nearest_upsampling(y, x, h, w):
    lowres = np.random.default_rng(3).random((6, 5)) < 0.5
    truth = np.array([[lowres[min(i // 4, 5), min(j // 4, 4)] for j in range(x, x + w)] for i in range(y, y + h)])
    np.testing.assert_array_equal(grid.lowres_window(lowres, 4, y, x, h, w), truth)


@pytest.mark.parametrize("height", [1, 255, 256, 600])
def test_window_counts_of_tall_bands_match_brute_force(height):
    """Column counts are summed in uint8 over slices of 255 rows: no overflow at any height."""
    band = np.random.default_rng(height).random((height, 40)) < 0.97
    starts = grid.grid_origins(40, 9, 4)
    np.testing.assert_array_equal(grid.window_counts(band, starts, 9), [band[:, x:x + 9].sum() for x in starts])
    np.testing.assert_array_equal(grid.window_counts(band[:, ::-1], starts, 9),
                                  [band[:, ::-1][:, x:x + 9].sum() for x in starts])
