"""Rendering any window of a synthetic slide: its tissue, tumour and kind masks, then its pixels.

`render_geometry` evaluates the layout's shapes in the warped frame; `render_image` paints the
textures (nuclei, channel balance, SHG fibres) and the background, and adds sensor noise drawn from
the generator it is given.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from data_pipeline.synthetic.layouts import SlideLayout
from data_pipeline.synthetic.noise import nuclei, value_noise


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """Masks of one window and its warped coordinates (None where no shape is near the window)."""

    tissue: np.ndarray  # (h, w) bool
    tumour: np.ndarray  # (h, w) bool, within tissue
    warped: tuple[np.ndarray, np.ndarray] | None
    kind: np.ndarray  # (h, w) uint8 index of the layout's texture at tissue pixels (tumour: the last)


def _warped_coordinates(layout: SlideLayout, y: np.ndarray, x: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    warped_y = np.broadcast_to(y, np.broadcast_shapes(y.shape, x.shape)).astype(np.float32)
    warped_x = np.broadcast_to(x, warped_y.shape).astype(np.float32)
    for cell, amplitude, key_y, key_x in layout.warp:
        warped_y += amplitude * value_noise(key_y, y / cell, x / cell)
        warped_x += amplitude * value_noise(key_x, y / cell, x / cell)
    return warped_y, warped_x


def render_geometry(layout: SlideLayout, y0: int, x0: int, h: int, w: int) -> TileGeometry:
    """Tissue and tumour masks of the window [y0, y0+h) x [x0, x0+w)."""
    tissue = np.zeros((h, w), bool)
    tumour = np.zeros((h, w), bool)
    boxes = layout.pixel_boxes
    near = np.flatnonzero((boxes[:, 0] < y0 + h) & (boxes[:, 2] > y0) & (boxes[:, 1] < x0 + w)
                          & (boxes[:, 3] > x0))
    boxes = [(layout.bodies[i], slice(max(boxes[i, 0] - y0, 0), min(boxes[i, 2] - y0, h)),
              slice(max(boxes[i, 1] - x0, 0), min(boxes[i, 3] - x0, w))) for i in near]
    kind = np.zeros((h, w), np.uint8)
    if not boxes:
        return TileGeometry(tissue, tumour, None, kind)
    y = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    x = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    warped_y, warped_x = _warped_coordinates(layout, y, x)
    for body, rows, cols in boxes:
        box_y, box_x = warped_y[rows, cols], warped_x[rows, cols]
        inside = body.shape.level(box_y, box_x) > 0
        tissue[rows, cols] |= inside
        box_kind = kind[rows, cols]  # a view: painted in place
        box_kind[inside] = body.base_kind
        for region, region_kind in body.regions:
            box_kind[inside & (region.level(box_y, box_x) > 0)] = region_kind
        for region in body.tumours:
            tumour[rows, cols] |= inside & (region.level(box_y, box_x) > 0)
    kind[tumour] = len(layout.textures) - 1
    return TileGeometry(tissue, tumour, (warped_y, warped_x), kind)


# Mean intensities (uint16 counts): background and tissue per channel, CARS / TPEF / SHG; each
# texture scales the tissue's CARS and TPEF means and its fibres.
_BACKGROUND = np.array([420.0, 260.0, 180.0], np.float32)
_TISSUE_CARS, _TISSUE_TPEF, _TISSUE_SHG, _FIBRE_SHG = 5200.0, 2400.0, 380.0, 6500.0


def render_image(layout: SlideLayout, geometry: TileGeometry, y0: int, x0: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint16 image of the window whose geometry is given; `rng` draws sensor noise."""
    h, w = geometry.tissue.shape
    keys = layout.keys
    y = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    x = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    mean = _BACKGROUND * (1.0 + 0.15 * value_noise(keys["background"], y / 300.0, x / 300.0))[..., None]
    if geometry.tissue.any():
        # Tissue signal only on the bounding box of the tissue in this window.
        rows = np.flatnonzero(geometry.tissue.any(axis=1))
        cols = np.flatnonzero(geometry.tissue.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        tissue, kind = geometry.tissue[box], geometry.kind[box]
        textures = layout.textures
        by, bx = y[box[0]], x[:, box[1]]
        stain = (1.0 + 0.25 * value_noise(keys["stain_coarse"], by / 280.0, bx / 280.0)
                 + 0.10 * value_noise(keys["stain_fine"], by / 40.0, bx / 40.0))
        texture = value_noise(keys["texture"], by / 3.0, bx / 3.0)
        blobs = np.zeros(kind.shape, np.float32)
        for index in np.unique(kind[tissue]):
            t = textures[index]
            blobs = np.where(kind == index, nuclei(keys[t.stream], by, bx, cell=t.nuclei_cell,
                                                   density=t.nuclei_density, radius=t.nuclei_radius), blobs)
        cars = _TISSUE_CARS * stain * (1.0 + 0.15 * texture) * (1.0 - 0.5 * blobs)
        tpef = _TISSUE_TPEF * stain * (1.0 + 0.25 * texture) * (1.0 - 0.25 * blobs)
        cars *= np.array([t.cars for t in textures], np.float32)[kind]
        tpef *= np.array([t.tpef for t in textures], np.float32)[kind]
        warped_y, warped_x = (c[box] for c in geometry.warped)
        # Collagen gains in float64, as the first generator multiplied them: classic bytes stay the same.
        collagen = _fibres(layout, by, bx, warped_y, warped_x) * np.array([t.collagen for t in textures])[kind]
        shg = _TISSUE_SHG * stain + _FIBRE_SHG * collagen
        mean_box = mean[box]
        mean_box[tissue] = np.stack([cars, tpef, shg], axis=-1)[tissue]
    noisy = mean + rng.standard_normal(mean.shape, dtype=np.float32) * (0.06 * mean + 30.0)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)


def _fibres(layout: SlideLayout, y: np.ndarray, x: np.ndarray, warped_y: np.ndarray,
            warped_x: np.ndarray) -> np.ndarray:
    """Collagen-like streaks in [0, 1]: three orientations, blended by smooth random weights."""
    weights = [np.exp(4.0 * value_noise(layout.keys[f"fibre_weight{k}"], y / 350.0, x / 350.0))
               for k in range(3)]
    total = sum(weights)
    fibres = np.zeros(warped_y.shape, np.float32)
    for k, angle in enumerate(layout.fibre_angles):
        along = (warped_x * math.cos(angle) + warped_y * math.sin(angle)) / 40.0
        across = (warped_y * math.cos(angle) - warped_x * math.sin(angle)) / 3.0
        streak = np.clip(2.5 * value_noise(layout.keys[f"fibre{k}"], along, across) - 0.8, 0.0, 1.0)
        fibres += weights[k] / total * streak * streak
    return fibres
