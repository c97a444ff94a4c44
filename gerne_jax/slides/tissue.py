"""Tissue detection on a low-resolution thumbnail with any number of channels.

    intensity = combine_channels(thumbnail)        # (h, w) in [0, 1]
    tissue = detect_tissue(thumbnail)              # (h, w) bool

Each channel is scaled to [0, 1] by its own robust percentiles (so one bright channel does not drown
the others), the channels are averaged, lightly smoothed, and split by Otsu's threshold. Which side of
the threshold is background ("polarity") is either given — "dark" for dark-field images
(fluorescence, nonlinear microscopy), "bright" for brightfield (H&E) — or inferred ("auto", see
`infer_background`: the more uniform side, else the side covering the image border). Small
objects and small holes are then removed: by default relative to the thumbnail size, and by area in µm²
(`MIN_OBJECT_UM2`, `MAX_HOLE_UM2`) when the slide's pixel size is known (`scan.physical_cleanup`).
"""
from __future__ import annotations

import numpy as np
from skimage import filters, morphology

POLARITIES = ("auto", "dark", "bright")
# Clean-up sizes when the thumbnail's pixel size is known (the slide states its own): tissue objects
# under about a 30 µm square (a few cells: dust, debris) are removed, holes under a 100 µm square filled.
MIN_OBJECT_UM2 = 1000.0
MAX_HOLE_UM2 = 10000.0
# How many times more spread one side of the threshold must be to call the other side background.
SPREAD_RATIO = 1.5


def combine_channels(thumbnail: np.ndarray, low_percentile: float = 1.0,
                     high_percentile: float = 99.0) -> np.ndarray:
    """(h, w) or (h, w, C) -> (h, w) float64 mean of channels each scaled to [0, 1] by percentiles.

    A channel with no spread between its percentiles carries no contrast and is left out; if no
    channel has any, the result is all zeros. Non-finite pixels count as the channel's low value.
    """
    image = np.asarray(thumbnail, dtype=np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"thumbnail must be (h, w) or (h, w, C), got shape {image.shape}")
    total, used = np.zeros(image.shape[:2]), 0
    for c in range(image.shape[-1]):
        channel = np.array(image[..., c])  # a copy: the steps below work in place
        is_finite = np.isfinite(channel)
        all_finite = is_finite.all()
        finite = channel if all_finite else channel[is_finite]
        if finite.size == 0:
            continue
        low, high = np.percentile(finite, [low_percentile, high_percentile])
        if high <= low:
            continue
        if not all_finite:
            channel[~is_finite] = low
        # In place, in the order (x - low) / (high - low), then clipped: the same values as the
        # expression written out, without its temporaries.
        channel -= low
        channel /= high - low
        total += np.clip(channel, 0.0, 1.0, out=channel)
        used += 1
    return total / used if used else total


def infer_background(bright: np.ndarray, intensity: np.ndarray | None = None) -> str:
    """"bright" or "dark": which side of the threshold is background.

    Rule: background is the more uniform side. Glass in brightfield and the dark field of
    fluorescence hold one level plus noise, while tissue mixes stains, structures and textures, so
    when the spread of `intensity` on one side is at least `SPREAD_RATIO` times the other's, the
    tighter side is background, whether or not tissue fills the frame and touches its border. The
    spread is the median absolute deviation, which the pixels blurred across the edge between the
    sides barely move. Otherwise (no intensity, or spreads alike) the background is the side
    covering more of the image border (tissue rarely fills the frame of a whole-slide thumbnail);
    on an exact tie, the side covering more of the image.
    """
    if intensity is not None and bright.any() and not bright.all():
        bright_spread, dark_spread = _median_absolute_deviation(intensity[bright]), \
            _median_absolute_deviation(intensity[~bright])
        if bright_spread * SPREAD_RATIO <= dark_spread:
            return "bright"
        if dark_spread * SPREAD_RATIO <= bright_spread:
            return "dark"
    border = np.concatenate([bright[0], bright[-1], bright[1:-1, 0], bright[1:-1, -1]])
    border_bright = border.mean() if border.size else 0.5
    if border_bright != 0.5:
        return "bright" if border_bright > 0.5 else "dark"
    return "bright" if bright.mean() > 0.5 else "dark"


def _median_absolute_deviation(values: np.ndarray) -> float:
    return float(np.median(np.abs(values - np.median(values))))


def detect_tissue(thumbnail: np.ndarray, polarity: str = "auto", min_object_px: int | None = None,
                  max_hole_px: int | None = None, sigma: float = 1.0,
                  min_object_fraction: float = 1e-4, max_hole_fraction: float = 5e-4) -> np.ndarray:
    """Tissue mask of a thumbnail, (h, w) bool.

    Args:
      thumbnail: (h, w) or (h, w, C) array in any units (e.g. `SlideReader.thumbnail`).
      polarity: background "dark", "bright", or "auto" (`infer_background`).
      min_object_px: tissue objects of this many pixels or fewer are removed; default
        `min_object_fraction` of the thumbnail's pixels.
      max_hole_px: holes of this many pixels or fewer inside tissue are filled; default
        `max_hole_fraction` of the thumbnail's pixels.
      sigma: Gaussian smoothing (thumbnail pixels) before thresholding; 0 turns it off.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    intensity = combine_channels(thumbnail)
    if sigma > 0:
        intensity = filters.gaussian(intensity, sigma=sigma)
    if intensity.size == 0 or intensity.min() == intensity.max():
        return np.zeros(intensity.shape, dtype=bool)  # no contrast: nothing to call tissue
    bright = intensity > filters.threshold_otsu(intensity)
    background = infer_background(bright, intensity) if polarity == "auto" else polarity
    tissue = ~bright if background == "bright" else bright
    num_pixels = tissue.size
    if min_object_px is None:
        min_object_px = int(min_object_fraction * num_pixels)
    if max_hole_px is None:
        max_hole_px = int(max_hole_fraction * num_pixels)
    if min_object_px > 0:
        tissue = morphology.remove_small_objects(tissue, max_size=min_object_px)
    if max_hole_px > 0:
        tissue = morphology.remove_small_holes(tissue, max_size=max_hole_px)
    return tissue
