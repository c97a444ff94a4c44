"""Per-slide QC thumbnails: the slide, its tissue and tumour outlines, and the kept patch grid.

Any number of channels is shown: one channel as grey, three as RGB, otherwise each channel gets its
own hue (evenly spaced on the colour wheel) and the hues are added, like a fluorescence composite.
"""
from __future__ import annotations

import colorsys
import math
import os
import pathlib

import numpy as np
from matplotlib.collections import PolyCollection

from gerne_jax.core import files

LABEL_COLOURS = {0: "#00e5ff", 1: "#ff1744"}  # non-tumour cyan, tumour red
TISSUE_COLOUR = "#ffffff"
TUMOUR_COLOUR = "#ff00ff"
MAX_DISPLAY_SIDE = 1000
MAX_ASPECT = 8  # a figure is at most this many times taller than wide (or wider than tall)


def channel_colours(num_channels: int) -> np.ndarray:
    """(C, 3) RGB weights: grey for one channel, R/G/B for three, evenly spaced hues otherwise."""
    if num_channels == 1:
        return np.ones((1, 3))
    if num_channels == 3:
        return np.eye(3)
    return np.array([colorsys.hsv_to_rgb(c / num_channels, 1.0, 1.0) for c in range(num_channels)])


def composite_rgb(thumbnail: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """(h, w, C) intensities -> (h, w, 3) float in [0, 1]; each channel stretched between percentiles."""
    image = np.asarray(thumbnail, np.float64)
    lo = np.percentile(image, low, axis=(0, 1))
    hi = np.percentile(image, high, axis=(0, 1))
    scaled = np.clip((image - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    return np.clip(scaled @ channel_colours(image.shape[-1]), 0.0, 1.0)


def save_qc_png(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    tissue: np.ndarray,
    tumour: np.ndarray,
    patch_yx: np.ndarray,
    patch_labels: np.ndarray,
    patch_size: int,
    factor: int,
    title: str,
) -> None:
    """Writes the QC figure of one slide to `path` (PNG, via a temporary name).

    `thumbnail` (h, w, C), `tissue` and `tumour` (h, w) bool are at 1/`factor` of the tiled level;
    `patch_yx` [N, 2] are the kept patches' top-left corners in tiled-level pixels.
    """
    path = pathlib.Path(path)
    step = max(1, math.ceil(max(thumbnail.shape[:2]) / MAX_DISPLAY_SIDE))  # the PNG shows no more
    thumbnail, tissue, tumour, factor = thumbnail[::step, ::step], tissue[::step, ::step], \
        tumour[::step, ::step], factor * step
    height, width = thumbnail.shape[:2]
    # Clamped, so that a slide one pixel wide still gives a figure of sensible size (imshow fits it).
    aspect = min(max(height / max(width, 1), 1 / MAX_ASPECT), MAX_ASPECT)
    figure, axis = files.new_figure(figsize=(8, 8 * aspect + 0.6), dpi=120)
    axis.imshow(composite_rgb(thumbnail), interpolation="nearest")
    for mask, colour in ((tissue, TISSUE_COLOUR), (tumour, TUMOUR_COLOUR)):
        # contour needs at least 2 x 2 values: a slide thinner than 2 thumbnail pixels has no outline
        if min(mask.shape) >= 2 and mask.any() and not mask.all():
            axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)
    side = patch_size / factor
    square = np.array([[0.0, 0.0], [side, 0.0], [side, side], [0.0, side]])
    for label, colour in LABEL_COLOURS.items():
        # One polygon collection from a vertex array: a slide's ten thousand patches would cost a
        # second as matplotlib Rectangle objects.
        corners = patch_yx[np.asarray(patch_labels) == label][:, ::-1] / factor - 0.5  # top-left (x, y)
        axis.add_collection(PolyCollection(corners[:, None, :] + square, facecolors="none", edgecolors=colour,
                                           linewidths=0.4))
    counts = np.bincount(np.asarray(patch_labels, np.int64), minlength=2)
    axis.set_title(f"{title}\n{counts[1]} tumour (red) / {counts[0]} non-tumour (cyan) patches; "
                   "tissue white, tumour magenta", fontsize=9)
    axis.set_axis_off()
    figure.tight_layout()
    files.save_figure(figure, path)
