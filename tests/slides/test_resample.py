"""`resample` (area means of a pixel grid on pixels of s source pixels a side) against an exact brute force.

For a rational s = p / q every source pixel is split into q x q fine pixels (np.repeat); a target pixel is
then exactly p x p fine pixels, and its area mean their plain mean (`tests.tiff_layouts.fine_block_sums`).
Coverage is counted on the same fine grid; target lengths with exact fractions.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from gerne_jax.slides import resample
from tests.tiff_layouts import fine_block_sums, random_image

# (p, q): s = p / q. Images are resampled by s >= 1 (`views.ResampledView`), masks by any s > 0; even p gives
# exact ties (a mean k + 1/2, a mask pixel covered exactly half).
IMAGE_SCALES = [(3, 2), (5, 3), (7, 4), (2, 1), (1, 1), (7, 5), (4, 3), (2, 3), (1, 2)]
MASK_SCALES = IMAGE_SCALES + [(7, 10), (1, 3)]


def whole_grid_means(source: np.ndarray, scale: float) -> np.ndarray:
    """The module's area means of every target pixel of `source`."""
    rows = resample.taps(0, resample.target_length(source.shape[0], scale), scale, source.shape[0])
    cols = resample.taps(0, resample.target_length(source.shape[1], scale), scale, source.shape[1])
    return resample.weighted(source[rows.start:rows.stop, cols.start:cols.stop], rows, cols)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("p, q", IMAGE_SCALES)
def test_area_means_equal_fine_grid_means(dtype, p, q):
    source = random_image(dtype, shape=(17, 23, 3), seed=p * 10 + q)
    sums = fine_block_sums(source, p, q)
    expected = sums / p ** 2
    means = whole_grid_means(source, p / q)
    assert means.shape == (17 * q // p, 23 * q // p, 3)
    np.testing.assert_allclose(means, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
    values = resample.to_dtype(means, dtype)
    assert values.dtype == dtype
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(values, expected.astype(dtype), rtol=1e-6)
    else:  # the nearest integer; a tie (exactly k + 1/2, 2 * sum = odd * p**2) may go either way
        ties = (2 * sums) % (2 * p * p) == p * p
        np.testing.assert_array_equal(values[~ties], np.rint(expected[~ties]).astype(dtype))
        assert np.isin(values[ties] - np.floor(expected[ties]), [0, 1]).all()


@pytest.mark.parametrize("p, q", [(5, 3), (1, 2)])
def test_area_means_of_a_single_channel_grid(p, q):
    source = random_image(np.uint16, shape=(13, 19), seed=4)
    np.testing.assert_allclose(whole_grid_means(source, p / q), fine_block_sums(source, p, q) / p ** 2,
                               rtol=1e-12)


@pytest.mark.parametrize("scale", [1.5, 5 / 3, 2.0, 2.8, 1.37, 2.9, 0.7, 1 / 3])
def test_windows_equal_the_crop_of_the_whole_grid_bit_for_bit(scale):
    source = random_image(np.float32, shape=(40, 53, 2), seed=7)
    whole = whole_grid_means(source, scale)
    rng = np.random.default_rng(int(scale * 1000))
    height, width = whole.shape[:2]
    windows = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 3, 2, 3)]
    for _ in range(25):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        windows.append((y, x, int(rng.integers(1, height - y + 1)), int(rng.integers(1, width - x + 1))))
    for y, x, h, w in windows:
        rows = resample.taps(y, h, scale, source.shape[0])
        cols = resample.taps(x, w, scale, source.shape[1])
        window = resample.weighted(source[rows.start:rows.stop, cols.start:cols.stop], rows, cols)
        assert np.array_equal(window, whole[y:y + h, x:x + w]), (y, x, h, w)


@pytest.mark.parametrize("p, q", MASK_SCALES)
def test_coverage_equals_fine_pixels_inside_at_least_half(p, q):
    mask = (np.random.default_rng(p * 100 + q).random((31, 29)) < 0.5).astype(np.uint8)
    inside = fine_block_sums(mask, p, q)  # fine pixels inside, of p**2
    got = resample.covered(whole_grid_means(mask, p / q))
    np.testing.assert_array_equal(got, 2 * inside >= p * p)
    if p % 2 == 0:  # the exact ties are there, and count as covered
        ties = 2 * inside == p * p
        assert ties.any()
        assert got[ties].all()


@pytest.mark.parametrize("p, q", MASK_SCALES + [(13, 10), (99, 70)])
def test_target_length_is_the_targets_inside_the_source(p, q):
    scale = p / q
    for n in range(1, 60):
        count = resample.target_length(n, scale)
        assert count == math.floor(Fraction(n * q, p))
        if count == 0:
            continue
        last = resample.taps(count - 1, 1, scale, n)
        used = last.weight[0] > 0
        assert (last.start + last.index[0][used] < n).all()
        assert last.weight[0].sum() == pytest.approx(1.0, abs=1e-12)  # its interval lies inside the source
        beyond = resample.taps(count, 1, scale, n)
        assert beyond.weight[0].sum() < 1 - 1e-9  # the next one's does not: `count` is the most


def test_taps_weights_are_the_overlaps_over_s():
    scale = 7 / 5
    got = resample.taps(3, 6, scale, 40)
    for row, target in enumerate(range(3, 9)):
        # brute force: source pixel k overlaps [target * 7/5, (target + 1) * 7/5) by this fraction of 7/5
        low, high = Fraction(7 * target, 5), Fraction(7 * (target + 1), 5)
        expected = {k: float((min(high, k + 1) - max(low, k)) / Fraction(7, 5))
                    for k in range(math.floor(low), math.ceil(high))}
        found = {}
        for index, weight in zip(got.index[row], got.weight[row]):
            if weight:
                found[got.start + int(index)] = weight
        assert found.keys() == expected.keys()
        for k, weight in expected.items():
            assert found[k] == pytest.approx(weight, abs=1e-12)


@pytest.mark.parametrize("scale", [0, -1.5])
def test_taps_refuse_a_scale_not_above_zero(scale):
    with pytest.raises(ValueError, match="scale must be > 0"):
        resample.taps(0, 3, scale, 10)
