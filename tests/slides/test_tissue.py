"""Tissue detection on synthetic thumbnails with known tissue discs (dark- and bright-field)."""
from __future__ import annotations

import numpy as np
import pytest

from gerne_jax.slides import tissue

SHAPE = (160, 200)
DISCS = ((50, 60, 30), (110, 140, 35), (40, 160, 18))  # (centre y, centre x, radius)


def disc_truth(shape=SHAPE, discs=DISCS) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, bool)
    for cy, cx, radius in discs:
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def dark_field(num_channels: int, seed: int = 0) -> np.ndarray:
    """Fluorescence-like: dark noisy background, tissue bright in some channels, channels of very
    different ranges (one uint16-like channel up to 60000, others up to ~255)."""
    rng = np.random.default_rng(seed)
    truth = disc_truth()
    channels = []
    for c in range(num_channels):
        scale = 60000.0 if c == 0 else 255.0
        background = rng.normal(0.05, 0.02, SHAPE)
        # Every channel sees the tissue, with different strengths and textures.
        signal = (0.25 + 0.5 * (c % 2)) * (1 + 0.3 * rng.standard_normal(SHAPE))
        channels.append(scale * np.clip(background + truth * signal, 0, None))
    return np.stack(channels, axis=-1).astype(np.float32)


def bright_field(seed: int = 0) -> np.ndarray:
    """H&E-like RGB: near-white background, pink/purple tissue."""
    rng = np.random.default_rng(seed)
    truth = disc_truth()
    background = np.array([242.0, 240.0, 245.0])
    stain = np.array([190.0, 110.0, 170.0])
    image = np.where(truth[..., None], stain, background) + rng.normal(0, 12, SHAPE + (3,))
    return np.clip(image, 0, 255).astype(np.float32)


@pytest.mark.parametrize("num_channels", [1, 3, 5])
def test_dark_field_discs_found_with_auto_polarity(num_channels):
    thumb = dark_field(num_channels)
    found = tissue.detect_tissue(thumb)
    assert iou(found, disc_truth()) > 0.9
    np.testing.assert_array_equal(found, tissue.detect_tissue(thumb, polarity="dark"))
    # The opposite polarity must give something very different (the test can fail).
    assert iou(tissue.detect_tissue(thumb, polarity="bright"), disc_truth()) < 0.2


def test_tissue_visible_in_one_of_five_channels():
    """Four channels are pure background noise; the fifth shows the tissue."""
    rng = np.random.default_rng(2)
    channels = [rng.normal(10, 3, SHAPE) for _ in range(5)]
    channels[3] = channels[3] + disc_truth() * rng.normal(80, 20, SHAPE)
    assert iou(tissue.detect_tissue(np.stack(channels, -1)), disc_truth()) > 0.9


def test_bright_field_discs_found_with_auto_polarity():
    thumb = bright_field()
    found = tissue.detect_tissue(thumb)
    assert iou(found, disc_truth()) > 0.9
    np.testing.assert_array_equal(found, tissue.detect_tissue(thumb, polarity="bright"))
    assert iou(tissue.detect_tissue(thumb, polarity="dark"), disc_truth()) < 0.2


def test_single_channel_2d_input_equals_3d_input():
    thumb = dark_field(1)
    np.testing.assert_array_equal(tissue.detect_tissue(thumb[..., 0]), tissue.detect_tissue(thumb))


def test_bright_channel_does_not_dominate_combination():
    """Channel 0 spans 0..60000, channel 1 0..255; after scaling both weigh the same."""
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 60000, SHAPE)
    b = rng.uniform(0, 255, SHAPE)
    combined = tissue.combine_channels(np.stack([a, b], -1))

    def scale(x):
        low, high = np.percentile(x, [1, 99])
        return np.clip((x - low) / (high - low), 0, 1)

    np.testing.assert_allclose(combined, (scale(a) + scale(b)) / 2)


def test_constant_channel_is_ignored_and_constant_image_has_no_tissue():
    thumb = dark_field(3)
    thumb[..., 1] = 7.0
    np.testing.assert_allclose(tissue.combine_channels(thumb),
                               tissue.combine_channels(thumb[..., [0, 2]]))
    assert not tissue.detect_tissue(np.full((20, 30, 2), 5.0)).any()


def test_small_specks_removed_and_small_holes_filled():
    truth = disc_truth()
    speck = np.zeros(SHAPE, bool)
    speck[140:142, 10:12] = True  # 4 pixels of tissue-like signal, far from the discs
    hole = np.zeros(SHAPE, bool)
    hole[108:111, 138:141] = True  # 9-pixel hole inside the big disc
    intensity = ((truth | speck) & ~hole).astype(float)
    found = tissue.detect_tissue(intensity, polarity="dark", sigma=0, min_object_px=10, max_hole_px=20)
    np.testing.assert_array_equal(found, truth)
    kept = tissue.detect_tissue(intensity, polarity="dark", sigma=0, min_object_px=0, max_hole_px=0)
    np.testing.assert_array_equal(kept, (truth | speck) & ~hole)


def filled_frame(kind: str, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, truth): tissue covers about 80 % of the frame and every edge of it (a region of
    interest cropped from a slide), with a few background openings; brightfield or dark field."""
    rng = np.random.default_rng(seed)
    truth = ~disc_truth(discs=((40, 50, 25), (115, 150, 30), (120, 40, 14)))
    if kind == "bright":
        stains = np.array([[190.0, 110.0, 170.0], [140.0, 70.0, 150.0]])
        texture = rng.integers(0, 2, (SHAPE[0] // 8 + 1, SHAPE[1] // 8 + 1)).repeat(8, 0).repeat(8, 1)
        tissue_rgb = stains[texture[:SHAPE[0], :SHAPE[1]]]
        image = np.where(truth[..., None], tissue_rgb, [242.0, 240.0, 245.0])
        image = image + rng.normal(0, 6, SHAPE + (3,))
    else:
        signal = 0.5 * (1 + 0.4 * rng.standard_normal(SHAPE))
        image = (rng.normal(0.05, 0.02, SHAPE) + truth * signal)[..., None]
    return np.clip(image, 0, None).astype(np.float32), truth


@pytest.mark.parametrize("kind", ["bright", "dark"])
def test_tissue_filling_the_frame_found_with_auto_polarity(kind):
    """Tissue touching every edge: the border holds mostly tissue, yet the uniform side is background."""
    thumb, truth = filled_frame(kind)
    bright = tissue.combine_channels(thumb) > 0.5
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    assert (border.mean() > 0.5) == (kind == "dark")  # the border alone would pick the wrong side
    found = tissue.detect_tissue(thumb)
    assert iou(found, truth) > 0.9
    np.testing.assert_array_equal(found, tissue.detect_tissue(thumb, polarity=kind))


def test_infer_background_prefers_the_uniform_side():
    rng = np.random.default_rng(4)
    bright = np.zeros((20, 20), bool)
    bright[5:15, 5:15] = True
    intensity = np.where(bright, rng.normal(0.8, 0.01, bright.shape), rng.normal(0.3, 0.1, bright.shape))
    assert tissue.infer_background(bright, intensity) == "bright"  # the border says "dark"
    assert tissue.infer_background(bright, 1 - intensity) == "bright"  # spreads of 0.1 vs 0.01 once more
    similar = np.where(bright, rng.normal(0.8, 0.08, bright.shape), rng.normal(0.3, 0.1, bright.shape))
    assert tissue.infer_background(bright, similar) == "dark"  # within SPREAD_RATIO: the border decides


def test_infer_background_border_rule_and_tie():
    bright = np.zeros((10, 10), bool)
    bright[0, :] = bright[-1, :] = bright[:, 0] = bright[:, -1] = True  # bright frame
    assert tissue.infer_background(bright) == "bright"
    assert tissue.infer_background(~bright) == "dark"
    tie = np.zeros((10, 10), bool)
    tie[:, :5] = True  # border half bright; bright area half too -> not > 0.5 -> dark
    tie[2:8, 5:8] = True  # interior only: more bright area, same border
    assert tissue.infer_background(tie) == "bright"


def test_bad_polarity_and_shape_raise():
    with pytest.raises(ValueError, match="polarity"):
        tissue.detect_tissue(dark_field(1), polarity="white")
    with pytest.raises(ValueError, match="shape"):
        tissue.detect_tissue(np.zeros((2, 3, 4, 5)))
