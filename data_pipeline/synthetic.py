"""Built-in synthetic multimodal slides (CARS, TPEF, SHG) with the tissue-amount shortcut of real data.

`gerne-jax synthetic --out DIR --slides N --size PIXELS --seed S [--layout L]` writes, per
slide, a tiled interleaved (Y, X, 3) uint16 TIFF, a tiled uint8 0/1 tumour mask of the same height and
width, and `DIR/manifest.csv` in the format of `gerne_jax.slides.manifest` (relative paths, a
deterministic split). Two layouts:
- `classic` (the default; the first generator, byte for byte): tumour bodies among strands and
  debris. Non-tumour tissue is strands, fragments and bands of stroma beside tumour, and never looks
  like tumour, so a classifier errs only on tumour patches with little tissue.
- `sections`: tumour inside large tissue sections that also hold large non-tumour regions of full
  tissue, stroma, normal tissue and inflammation, whose textures lie part of the way from stroma to
  tumour (`Texture.toward`). Inflammation comes closest: dense nuclei and little collagen, with
  smaller nuclei and a smaller TPEF/CARS shift than tumour. Detached tumour clusters of a few cells
  and medium bodies, most with tumour, give tumour patches with little tissue; more strands than in
  `classic` keep most non-tumour patches nearly empty. A model that leans on the amount of tissue
  then errs on both minority groups.

How a slide is made (both layouts; `sections` puts sections where `classic` has large bodies):
- Geometry is a list of shapes (`SlideLayout`), sampled once per slide: two or three large tissue
  bodies and several medium ones (sizes relative to the slide) that carry nearly all the tumour, thin
  strands of torn tissue, and many small fragments and specks of debris (absolute sizes, counts
  growing with the area). Each shape is an ellipse with a lobed outline (a few angular harmonics),
  evaluated in a coordinate frame that is warped by smooth noise at three scales, so outlines are
  irregular down to single pixels. Tumour regions are shapes of their own, clipped to their body, so
  they reach the body's edge in places (tumour patches with little tissue) and leave normal tissue
  beside them (non-tumour patches with much tissue); strands give non-tumour patches with little
  tissue that survive tissue detection (most debris is below its small-object size, as on real
  slides).
- Pixels are rendered tile by tile (`TILE` pixels a side) and streamed to tifffile, so memory does not
  grow with the slide. All spatially coherent noise is lattice "value noise" whose lattice values are
  a hash of (slide key, lattice point): any tile can be rendered alone, tiles join without seams, and
  the result does not depend on the tile size. Per-pixel sensor noise comes from a generator seeded
  by (seed, slide, tile row, tile column).
- The signal a classifier can learn: tumour has a TPEF/CARS ratio about 15% higher than normal
  stroma, denser and larger nucleus-like dark blobs, and little SHG collagen; stroma carries SHG
  fibres. Each kind of tissue is a `Texture`; a per-pixel kind map (`TileGeometry.kind`) picks it.
  The background is dark with noise.

Calibration: with the tiler's default tissue detection, slides of 2048 pixels tiled at P = 64 give
tumour patches a median tissue ratio above 0.9, non-tumour patches below 0.1, and at tau = 0.1 about
4-8% of patches in each minority group (tests/test_synthetic.py measures this). At P = 32 the group
of non-tumour patches with much tissue grows to ~15% (strands fill more of a small patch). Other
sizes shift the shares: body sizes scale with the slide, so at 1024 pixels P = 32 behaves like 2048
at 64 (at 1024 with P = 64 bodies span only a few patches), while strands, fragments and texture keep
their pixel sizes.

Calibration of `sections` (2048-pixel slides, P = 64, the tiler's tissue detection, 12 slides of
seed 0): median tissue ratio 0.88 for tumour patches and 0.06 for non-tumour ones, about 30% of
non-tumour patches with a tissue ratio >= 0.5 (classic: a few %), and at tau = 0.1 about 7% of
patches in the group (tumour, r < 0.1) and 27% in (non-tumour, r >= 0.1). The textures were set so
that ERM with the demo setting errs on both minority groups while its average accuracy stays above
0.9; docs/results.md gives its per-group test accuracies.

The same arguments always give byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import pathlib
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile
from tqdm import tqdm

from gerne_jax.core import files
from gerne_jax.core.errors import InputError

CHANNEL_NAMES = ("CARS", "TPEF", "SHG")
TILE = 256  # TIFF tile side and rendering unit (tifffile needs a multiple of 16)
MIN_SIZE = 256
SIZE_SHRINK = 0.08  # slide sides vary between 92% and 100% of --size
SPLIT_FRACTIONS = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
LAYOUTS = ("classic", "sections")
DEFLATE_LEVEL = 1  # fast; the noisy image hardly compresses further at higher levels

# Domain warp applied before shapes are evaluated: (lattice cell in pixels, displacement amplitude).
# Slides of 3072 pixels and more get coarser octaves too (cells doubling, amplitude COARSE_WARP * cell)
# so that their large bodies stay irregular at their own scale.
WARP_OCTAVES = ((256.0, 20.0), (64.0, 10.0), (14.0, 3.5))
COARSE_WARP = 0.12
HARMONICS = np.arange(2, 7)  # angular frequencies of the lobed outlines

# Noise streams: each gets its own hash key per slide.
_STREAMS = (
    "warp_y0", "warp_x0", "warp_y1", "warp_x1", "warp_y2", "warp_x2",
    "stain_coarse", "stain_fine", "texture", "background",
    "nuclei_normal", "nuclei_tumour", "fibre_weight0", "fibre_weight1", "fibre_weight2",
    "fibre0", "fibre1", "fibre2",
)


# ----------------------------------------------------------------------------------------------
# Hashed lattice noise


def _hash_uniform(key: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 from (key, i, j) integer lattice coordinates (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(i, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(j, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) ^ np.uint64(key)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def value_noise(key: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth noise in [-1, 1] at lattice coordinates (u, v) (arrays that broadcast together).

    Lattice values are hashed from (key, lattice point) and interpolated with a smoothstep, so the
    field is a deterministic function of position: any window can be evaluated on its own. A column
    `u` (h, 1) with a row `v` (1, w) takes a cheaper separable path (same values).
    """
    u = np.asarray(u, np.float32)
    v = np.asarray(v, np.float32)
    iu, su = _lattice_cell(u)
    iv, sv = _lattice_cell(v)
    u0, v0 = int(iu.min()), int(iv.min())
    table = 2.0 * _hash_uniform(key, np.arange(u0, int(iu.max()) + 2)[:, None],
                                np.arange(v0, int(iv.max()) + 2)[None, :]) - 1.0
    a, b = iu - u0, iv - v0
    if u.ndim == v.ndim == 2 and u.shape[1] == 1 and v.shape[0] == 1:
        b, sv = b[0], sv[0]
        along_v = table[:, b] + sv * (table[:, b + 1] - table[:, b])  # (lattice rows, w)
        a = a[:, 0]
        return along_v[a] + su * (along_v[a + 1] - along_v[a])
    flat, stride = table.ravel(), table.shape[1]
    index = a * stride + b
    corner = flat[index]
    top = corner + sv * (flat[index + 1] - corner)
    corner = flat[index + stride]
    bottom = corner + sv * (flat[index + stride + 1] - corner)
    return top + su * (bottom - top)


def _lattice_cell(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer lattice cell and smoothstep weight of each coordinate."""
    floor = np.floor(u)
    t = u - floor
    return floor.astype(np.int64), t * t * (3.0 - 2.0 * t)


def nuclei(key: int, y: np.ndarray, x: np.ndarray, cell: float, density: float,
           radius: float) -> np.ndarray:
    """Nucleus-like blobs in [0, 1] on pixel rows `y` (h, 1) and columns `x` (1, w).

    One candidate nucleus per `cell`-sized grid cell at a hashed position, present with probability
    `density`, with a hashed radius r in [0.7, 1.3] * `radius` and the profile (1 - d^2 / (2r)^2)^2
    for d < 2r (<= cell). That support is compact, so the 3 x 3 cells around a pixel hold every blob
    that reaches it: the field is exact, seamless across windows. Blobs overlap by maximum.
    """
    cell_y = np.floor(y / cell).astype(np.int64)
    cell_x = np.floor(x / cell).astype(np.int64)
    y0, x0 = int(cell_y.min()) - 1, int(cell_x.min()) - 1
    rows = np.arange(y0, int(cell_y.max()) + 2)[:, None]
    cols = np.arange(x0, int(cell_x.max()) + 2)[None, :]
    # Four independent hashes per cell from disjoint lattice rows: jitter y, jitter x, presence, size.
    offset_y = (_hash_uniform(key, 4 * rows, cols) * cell).ravel()  # centre - cell corner
    offset_x = (_hash_uniform(key, 4 * rows + 1, cols) * cell).ravel()
    present = _hash_uniform(key, 4 * rows + 2, cols) < density
    support = np.minimum(2.0 * radius * (0.7 + 0.6 * _hash_uniform(key, 4 * rows + 3, cols)), cell)
    inv_support2 = np.where(present, 1.0 / support ** 2, np.inf).astype(np.float32).ravel()
    result = np.zeros(np.broadcast_shapes(y.shape, x.shape), np.float32)
    for dy in (-1, 0, 1):
        a = cell_y - y0 + dy
        from_row = (y - (a + y0) * cell).astype(np.float32)  # pixel - cell corner, (h, 1)
        for dx in (-1, 0, 1):
            b = cell_x - x0 + dx
            from_col = (x - (b + x0) * cell).astype(np.float32)
            index = a * cols.shape[1] + b
            d2 = (from_row - offset_y[index]) ** 2 + (from_col - offset_x[index]) ** 2
            falloff = np.maximum(1.0 - d2 * inv_support2[index], 0.0)
            np.maximum(result, falloff * falloff, out=result)
    return result


# ----------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Shape:
    """Ellipse with a lobed outline, r(theta) = 1 + sum_k amp_k cos(k theta + phase_k), warped frame."""

    centre: tuple[float, float]  # (y, x) pixels
    axes: tuple[float, float]  # semi-axes (along, across) in pixels
    angle: float  # radians
    lobe_amplitudes: tuple[float, ...]  # one per HARMONICS entry
    lobe_phases: tuple[float, ...]

    @property
    def reach(self) -> float:
        """Radius of a disc around the centre that contains the shape (warped frame)."""
        return max(self.axes) * (1.0 + sum(abs(a) for a in self.lobe_amplitudes))

    @property
    def extent(self) -> tuple[float, float]:
        """Half height and half width of a box around the centre that contains the shape."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        along, across = self.axes
        lobes = 1.0 + sum(abs(a) for a in self.lobe_amplitudes)
        return (lobes * math.hypot(along * sin, across * cos), lobes * math.hypot(along * cos, across * sin))

    def level(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Positive inside the shape, negative outside (1 at the centre)."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        dy, dx = y - self.centre[0], x - self.centre[1]
        along = (dx * cos + dy * sin) / self.axes[0]
        across = (dy * cos - dx * sin) / self.axes[1]
        radius = np.sqrt(along * along + across * across)
        # cos/sin of k*theta by the angle-addition recurrence (cheaper than arctan2 and cos).
        safe = np.maximum(radius, np.float32(1e-12))
        cos_1, sin_1 = along / safe, across / safe
        cos_k, sin_k = cos_1, sin_1
        outline = np.ones_like(radius)
        for k in range(2, int(HARMONICS[-1]) + 1):
            cos_k, sin_k = cos_k * cos_1 - sin_k * sin_1, sin_k * cos_1 + cos_k * sin_1
            if k >= HARMONICS[0]:
                i = k - int(HARMONICS[0])
                phase = self.lobe_phases[i]
                outline += self.lobe_amplitudes[i] * (cos_k * math.cos(phase) - sin_k * math.sin(phase))
        return 1.0 - radius / outline


@dataclasses.dataclass(frozen=True)
class Texture:
    """How one kind of tissue looks: nucleus-like blobs, channel balance and collagen (SHG fibres)."""

    name: str
    stream: str  # noise stream of its nuclei (a key of `SlideLayout.keys`)
    nuclei_cell: float  # one candidate nucleus per cell of this side (pixels)
    nuclei_density: float  # probability that a candidate is present
    nuclei_radius: float  # pixels
    cars: float  # multiplier of the CARS mean
    tpef: float  # multiplier of the TPEF mean
    collagen: float  # multiplier of the SHG fibres

    def toward(self, other: Texture, t: float, name: str, **fixed: float) -> Texture:
        """The texture a fraction `t` of the way to `other`, field by field, with `fixed` fields set."""
        fields = {f.name: (1.0 - t) * getattr(self, f.name) + t * getattr(other, f.name)
                  for f in dataclasses.fields(self) if f.name not in ("name", "stream")}
        return Texture(name=name, stream=f"nuclei_{name}", **{**fields, **fixed})


# Classic slides use two textures: normal stroma and tumour.
STROMA_TEXTURE = Texture("stroma", "nuclei_normal", nuclei_cell=12.0, nuclei_density=0.45, nuclei_radius=2.0,
                         cars=1.0, tpef=1.0, collagen=1.0)
TUMOUR_TEXTURE = Texture("tumour", "nuclei_tumour", nuclei_cell=7.0, nuclei_density=0.85, nuclei_radius=2.6,
                         cars=0.93, tpef=1.07, collagen=0.12)  # TPEF/CARS ratio x1.15
# Sections add normal tissue and inflammation, part of the way from stroma to tumour: less collagen,
# denser nuclei, a smaller channel shift. Inflammation comes closest (dense nuclei, little collagen) but
# its nuclei stay small: the remaining contrast is subtle, yet learnable. With a wider contrast (0.5;
# 0.8 with nuclei of radius 1.8) ERM learnt it and misclassified about 1% of the non-tumour patches
# full of tissue (docs/results.md, "ERM on the sections layout").
NORMAL_TEXTURE = STROMA_TEXTURE.toward(TUMOUR_TEXTURE, 0.6, "normal_tissue")
INFLAMMATION_TEXTURE = STROMA_TEXTURE.toward(TUMOUR_TEXTURE, 0.9, "inflammation", nuclei_radius=2.1)
CLASSIC_TEXTURES = (STROMA_TEXTURE, TUMOUR_TEXTURE)
SECTION_TEXTURES = (STROMA_TEXTURE, NORMAL_TEXTURE, INFLAMMATION_TEXTURE, TUMOUR_TEXTURE)
STROMA, NORMAL, INFLAMMATION = range(3)  # indices of SECTION_TEXTURES (tumour is the last)
# Sections and medium bodies are stroma or normal tissue; regions inside sections are normal tissue
# or inflammation and stay off the section's edge, so inflammation fills whole patches.
BASE_KINDS = (STROMA, NORMAL)
REGION_KINDS = (NORMAL, INFLAMMATION)

# Sections layout geometry: sections per slide [low, high), radius relative to the slide side; inner
# regions per section [low, high) and their radii relative to the section's.
SECTIONS = (2, 4)
SECTION_RADIUS = (0.12, 0.16)
SECTION_REGIONS = (2, 5)
SECTION_REGION_SCALE = (0.25, 0.45)
SECTION_REGION_REACH = (0.0, 0.55)  # distance of a region's centre from the section's
SECTION_TUMOURS = (1, 3)
SECTION_TUMOUR_SCALE = (0.5, 0.7)
SECTION_TUMOUR_REACH = (0.3, 0.9)  # distance of a tumour region's centre from the section's
SECTION_BUDS = 15.0  # expected detached tumour clusters per 2048^2 pixels
SECTION_STRANDS = 64.0  # expected strands per 2048^2 pixels (classic: 32)


@dataclasses.dataclass(frozen=True)
class Body:
    """A piece of tissue and the tumour regions inside it (tumour = body AND any region).

    On sections slides a body also has a kind of tissue (`base_kind`, an index of the layout's
    textures) and regions of other kinds painted over it, later ones on top; tumour is on top of all.
    """

    shape: Shape
    tumours: tuple[Shape, ...] = ()
    regions: tuple[tuple[Shape, int], ...] = ()
    base_kind: int = STROMA


@dataclasses.dataclass(frozen=True)
class SlideLayout:
    """Everything needed to render any window of one slide."""

    height: int
    width: int
    bodies: tuple[Body, ...]
    keys: dict[str, int]  # noise stream -> hash key
    fibre_angles: tuple[float, float, float]
    warp: tuple[tuple[float, float, int, int], ...]  # octaves: cell, amplitude, key y, key x
    textures: tuple[Texture, ...] = CLASSIC_TEXTURES  # kinds of tissue, tumour last

    @property
    def max_warp(self) -> float:
        """Largest displacement of the warp along either axis (value noise is within [-1, 1])."""
        return sum(amplitude for _, amplitude, _, _ in self.warp)

    @functools.cached_property
    def pixel_boxes(self) -> np.ndarray:
        """(num_bodies, 4) int64 top, left, bottom, right (exclusive) of each body in pixels: its
        extent in the warped frame plus the largest warp displacement."""
        boxes = np.zeros((len(self.bodies), 4), np.int64)
        margin = self.max_warp
        for i, body in enumerate(self.bodies):
            (cy, cx), (ey, ex) = body.shape.centre, body.shape.extent
            boxes[i] = (math.floor(cy - ey - margin), math.floor(cx - ex - margin),
                        math.ceil(cy + ey + margin) + 1, math.ceil(cx + ex + margin) + 1)
        return boxes


def _random_shape(rng: np.random.Generator, centre: tuple[float, float], radius: float,
                  elongation: float = 0.35, lobes: float = 0.12) -> Shape:
    ratio = 1.0 + rng.uniform(0.0, elongation)
    amplitudes = rng.uniform(0.0, lobes, len(HARMONICS)) / np.sqrt(HARMONICS / 2.0)
    return Shape(centre=(float(centre[0]), float(centre[1])),
                 axes=(radius * math.sqrt(ratio), radius / math.sqrt(ratio)),
                 angle=float(rng.uniform(0.0, math.pi)),
                 lobe_amplitudes=tuple(float(a) for a in amplitudes),
                 lobe_phases=tuple(float(p) for p in rng.uniform(0.0, 2 * math.pi, len(HARMONICS))))


def _place(rng: np.random.Generator, height: int, width: int, radius: float, taken: np.ndarray,
           margin: float, spacing: float, tries: int = 200) -> tuple[float, float] | None:
    """A centre `margin*radius` inside the slide, `spacing*(radius + r)` clear of each taken disc
    (rows of `taken`: y, x, r), or None after `tries` draws."""
    inset_y = min(margin * radius, height / 2)
    inset_x = min(margin * radius, width / 2)
    for _ in range(tries):
        cy = rng.uniform(inset_y, height - inset_y)
        cx = rng.uniform(inset_x, width - inset_x)
        if np.all(np.hypot(cy - taken[:, 0], cx - taken[:, 1]) > spacing * (radius + taken[:, 2])):
            return cy, cx
    return None


class _Pieces:
    """Places the pieces of one slide in draw order (the order fixes every random draw)."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng, self.height, self.width = rng, height, width
        self.bodies: list[Body] = []
        # Large and medium bodies keep clear of each other; smaller pieces keep clear of those only
        # (they may overlap one another), which keeps placement linear in the number of pieces.
        self.big_discs = np.zeros((0, 3))

    def place(self, radius: float, big: bool, margin: float, spacing: float) -> tuple[float, float] | None:
        centre = _place(self.rng, self.height, self.width, radius, self.big_discs, margin, spacing)
        if centre is not None and big:
            self.big_discs = np.vstack([self.big_discs, [centre[0], centre[1], radius]])
        return centre

    def add(self, radius: float, tumour_probability: float, margin: float, spacing: float,
            base_kind: int = STROMA, big: bool | None = None, **shape_kw) -> None:
        """A body; with `tumour_probability` it carries tumour regions nearly as big as itself. Big
        ones (by default those that may carry tumour) keep later pieces clear of them."""
        rng = self.rng
        big = tumour_probability > 0 if big is None else big
        centre = self.place(radius, big, margin, spacing)
        if centre is None:
            return
        shape = _random_shape(rng, centre, radius, **shape_kw)
        tumours = ()
        if rng.uniform() < tumour_probability:
            # Tumour regions nearly as big as the body, shifted off-centre: they reach the body's edge
            # on one side and leave a band of normal tissue on the other.
            tumours = tuple(
                _random_shape(rng, (centre[0] + radius * 0.25 * math.sin(t),
                                    centre[1] + radius * 0.25 * math.cos(t)),
                              radius * rng.uniform(0.95, 1.15), lobes=0.2)
                for t in rng.uniform(0.0, 2 * math.pi, rng.integers(1, 3)))
        self.bodies.append(Body(shape, tumours, base_kind=base_kind))

    def add_section(self, radius: float) -> None:
        """A large tissue section: a base of stroma or normal tissue, regions of normal tissue and
        inflammation inside, and tumour regions anywhere in it, some reaching the section's edge."""
        rng = self.rng
        centre = self.place(radius, True, margin=1.05, spacing=1.0)
        if centre is None:
            return
        shape = _random_shape(rng, centre, radius, elongation=0.5, lobes=0.2)

        def inner(scale: tuple[float, float], reach: tuple[float, float]) -> Shape:
            angle, distance = rng.uniform(0.0, 2 * math.pi), radius * rng.uniform(*reach)
            return _random_shape(rng, (centre[0] + distance * math.sin(angle),
                                       centre[1] + distance * math.cos(angle)),
                                 radius * rng.uniform(*scale), elongation=0.6, lobes=0.25)

        base_kind = int(rng.choice(BASE_KINDS))
        regions = tuple((inner(SECTION_REGION_SCALE, SECTION_REGION_REACH), int(rng.choice(REGION_KINDS)))
                        for _ in range(rng.integers(*SECTION_REGIONS)))
        tumours = tuple(inner(SECTION_TUMOUR_SCALE, SECTION_TUMOUR_REACH)
                        for _ in range(rng.integers(*SECTION_TUMOURS)))
        self.bodies.append(Body(shape, tumours, regions, base_kind))

    def add_small_pieces(self, side: float, area_scale: float, strands: float,
                         strand_spacing: float = 1.0) -> None:
        """Fragments, strands and debris: non-tumour tissue that fills little of a patch. Strands keep
        `strand_spacing` * (half length + radius) clear of the centres of big bodies."""
        rng = self.rng
        # Small fragments (absolute size, count grows with area).
        for _ in range(rng.poisson(40 * area_scale)):
            self.add(rng.uniform(3.0, 7.0), 0.0, margin=1.5, spacing=1.2, lobes=0.2)
        # Strands: thin torn strips of tissue, a few pixels wide; long enough to survive tissue
        # detection's small-object removal (relative to the slide), thin enough to fill little of a patch.
        for _ in range(rng.poisson(strands * area_scale)):
            half_length = min(side, 2048.0) * rng.uniform(0.05, 0.10)
            centre = self.place(half_length, False, margin=1.2, spacing=strand_spacing)
            if centre is not None:
                self.bodies.append(Body(Shape(centre=centre, axes=(half_length, rng.uniform(1.0, 1.8)),
                                              angle=float(rng.uniform(0.0, math.pi)),
                                              lobe_amplitudes=(0.0,) * len(HARMONICS),
                                              lobe_phases=(0.0,) * len(HARMONICS))))
        # Debris: specks of a few pixels.
        for _ in range(rng.poisson(300 * area_scale)):
            self.add(rng.uniform(2.0, 6.0), 0.0, margin=2.0, spacing=1.0, elongation=1.0, lobes=0.25)


def sample_layout(seed: int, slide_index: int, nominal_size: int, layout: str = "classic") -> SlideLayout:
    """Slide size and shapes for one slide; depends only on (seed, slide_index, nominal_size, layout)."""
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    sections = layout == "sections"
    rng = np.random.default_rng([seed, slide_index, nominal_size] + ([1] if sections else []))
    height, width = (int(round(nominal_size * (1.0 - rng.uniform(0.0, SIZE_SHRINK))))
                     for _ in range(2))
    side = math.sqrt(height * width)
    keys = {name: int(k) for name, k in zip(_STREAMS, rng.integers(0, 2 ** 63, len(_STREAMS)))}
    pieces = _Pieces(rng, height, width)
    area_scale = height * width / 2048.0 ** 2
    if sections:
        for _ in range(rng.integers(*SECTIONS)):
            pieces.add_section(side * rng.uniform(*SECTION_RADIUS))
        # Medium bodies of stroma or normal tissue, most with tumour.
        for _ in range(rng.integers(4, 9)):
            pieces.add(side * rng.uniform(0.03, 0.05), 0.8, margin=1.2, spacing=1.0,
                       base_kind=int(rng.choice(BASE_KINDS)), lobes=0.2)
        # Detached tumour clusters of a few cells: tumour patches with little tissue.
        for _ in range(rng.poisson(SECTION_BUDS * area_scale)):
            pieces.add(rng.uniform(4.0, 12.0), 1.0, margin=1.5, spacing=1.2, big=False, lobes=0.2)
        pieces.add_small_pieces(side, area_scale, strands=SECTION_STRANDS, strand_spacing=0.7)
    else:
        # Large, tumour-bearing bodies (size relative to the slide).
        for _ in range(rng.integers(2, 4)):
            pieces.add(side * rng.uniform(0.11, 0.15), 1.0, margin=1.1, spacing=1.0, lobes=0.2)
        # Medium bodies, most with tumour.
        for _ in range(rng.integers(4, 9)):
            pieces.add(side * rng.uniform(0.03, 0.05), 0.9, margin=1.2, spacing=1.0, lobes=0.2)
        pieces.add_small_pieces(side, area_scale, strands=32)
    fibre_angles = tuple(float(a) for a in rng.uniform(0.0, math.pi, 3))
    # Coarser octaves for large slides (drawn last, so slides up to ~3000 pixels do not change).
    coarse_cells = [256.0 * 2 ** k for k in range(1, 16) if 1536.0 * 2 ** k <= side]
    coarse = [(cell, COARSE_WARP * cell, *map(int, rng.integers(0, 2 ** 63, 2))) for cell in coarse_cells]
    warp = tuple(coarse) + tuple((cell, amplitude, keys[f"warp_y{octave}"], keys[f"warp_x{octave}"])
                                 for octave, (cell, amplitude) in enumerate(WARP_OCTAVES))
    textures = CLASSIC_TEXTURES
    if sections:
        textures = SECTION_TEXTURES
        new_streams = sorted({t.stream for t in textures} - set(keys))
        keys.update(zip(new_streams, map(int, rng.integers(0, 2 ** 63, len(new_streams)))))
    return SlideLayout(height=height, width=width, bodies=tuple(pieces.bodies), keys=keys,
                       fibre_angles=fibre_angles, warp=warp, textures=textures)


# ----------------------------------------------------------------------------------------------
# Rendering


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


# ----------------------------------------------------------------------------------------------
# Files


def _tile_origins(height: int, width: int) -> list[tuple[int, int]]:
    return [(ty, tx) for ty in range(0, height, TILE) for tx in range(0, width, TILE)]


def _padded(tile: np.ndarray) -> np.ndarray:
    """Zero-pad an edge tile to TILE x TILE (tifffile's iterator needs full tiles)."""
    pad = [(0, TILE - tile.shape[0]), (0, TILE - tile.shape[1])] + [(0, 0)] * (tile.ndim - 2)
    return np.pad(tile, pad)


def _write_tiff(path: pathlib.Path, tiles: Iterator[np.ndarray | bytes], shape: tuple[int, ...],
                dtype: type, channel_names: Sequence[str] | None = None) -> None:
    """Tiled deflate TIFF from an iterator of tiles (arrays, or deflate-compressed bytes), written
    to a temp name then renamed."""
    metadata = {"axes": "YXS", "channel_names": list(channel_names)} if channel_names else {"axes": "YX"}
    with files.atomic_write(path) as partial:
        tifffile.imwrite(partial, data=tiles, shape=shape, dtype=dtype, tile=(TILE, TILE),
                         photometric="minisblack", planarconfig="contig" if channel_names else None,
                         compression="zlib", compressionargs={"level": DEFLATE_LEVEL}, metadata=metadata)


def write_slide(layout: SlideLayout, seed: int, slide_index: int, image_path: pathlib.Path,
                mask_path: pathlib.Path, tissue_mask_path: pathlib.Path | None = None,
                progress: tqdm | None = None) -> None:
    """Render one slide tile by tile: image TIFF, tumour mask TIFF, optional true tissue mask TIFF.

    Geometry is computed once per tile; the mask tiles are kept deflate-compressed (a few hundred
    bytes each, mostly zeros) and written after the image.
    """
    mask_tiles: dict[str, list[bytes]] = {"tumour": [], "tissue": []}

    def image_tiles() -> Iterator[np.ndarray]:
        for ty, tx in _tile_origins(layout.height, layout.width):
            h, w = min(TILE, layout.height - ty), min(TILE, layout.width - tx)
            geometry = render_geometry(layout, ty, tx, h, w)
            for name in mask_tiles if tissue_mask_path is not None else ("tumour",):
                mask = _padded(getattr(geometry, name).astype(np.uint8))
                mask_tiles[name].append(zlib.compress(mask.tobytes(), DEFLATE_LEVEL))
            rng = np.random.default_rng([seed, slide_index, ty // TILE, tx // TILE])
            image = render_image(layout, geometry, ty, tx, rng)
            if progress is not None:
                progress.update(1)
            yield _padded(image)

    _write_tiff(image_path, image_tiles(), (layout.height, layout.width, len(CHANNEL_NAMES)),
                np.uint16, CHANNEL_NAMES)
    _write_tiff(mask_path, iter(mask_tiles["tumour"]), (layout.height, layout.width), np.uint8)
    if tissue_mask_path is not None:
        _write_tiff(tissue_mask_path, iter(mask_tiles["tissue"]), (layout.height, layout.width),
                    np.uint8)


def assign_splits(num_slides: int, seed: int) -> list[str]:
    """Split per slide, ~60/20/20, deterministic in (num_slides, seed); each split non-empty if N >= 3."""
    counts = {name: int(round(fraction * num_slides)) for name, fraction in SPLIT_FRACTIONS[1:]}
    if num_slides >= 3:
        counts = {name: max(1, count) for name, count in counts.items()}
    elif num_slides == 2:
        counts = {"validation": 1, "test": 0}
    else:
        counts = {"validation": 0, "test": 0}
    splits = (["validation"] * counts["validation"] + ["test"] * counts["test"]
              + ["train"] * (num_slides - sum(counts.values())))
    order = np.random.default_rng([seed, num_slides]).permutation(num_slides)
    return [splits[i] for i in order]


def generate(out_dir: str | os.PathLike, num_slides: int, size: int, seed: int = 0,
             write_tissue_masks: bool = False, show_progress: bool = True,
             layout: str = "classic") -> pathlib.Path:
    """Write `num_slides` synthetic slides and `out_dir/manifest.csv`; return the manifest path.

    `size` is the nominal side in pixels (each side is 92-100% of it). With
    `write_tissue_masks`, the true tissue geometry is written too (`tissue_mask` column), e.g. for
    tests; by default the tiler detects tissue from the image like on real data. `layout` is
    `classic` (the first generator, kept byte for byte) or `sections` (see the module docstring).
    """
    if num_slides < 1:
        raise InputError(f"--slides must be >= 1, got {num_slides}")
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if size < MIN_SIZE:
        raise InputError(f"--size must be >= {MIN_SIZE} pixels, got {size}")
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    layouts = [sample_layout(seed, index, size, layout) for index in range(num_slides)]
    splits = assign_splits(num_slides, seed)
    total_tiles = sum(len(_tile_origins(lay.height, lay.width)) for lay in layouts)
    rows = []
    with tqdm(total=total_tiles, desc="synthetic tiles", unit="tile", disable=not show_progress) as bar:
        for index, (layout, split) in enumerate(zip(layouts, splits)):
            slide_id = f"slide_{index:03d}"
            slide_files = {"image": f"{slide_id}.tif", "mask": f"{slide_id}_tumour.tif"}
            if write_tissue_masks:
                slide_files["tissue_mask"] = f"{slide_id}_tissue.tif"
            write_slide(layout, seed, index, out / slide_files["image"], out / slide_files["mask"],
                        out / slide_files["tissue_mask"] if write_tissue_masks else None, progress=bar)
            rows.append({"slide_id": slide_id, **slide_files, "patient_id": f"patient_{index:03d}",
                         "split": split, "channel_names": ";".join(CHANNEL_NAMES)})
    manifest = out / "manifest.csv"
    with files.atomic_write(manifest) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = generate(args.out, args.slides, args.size, args.seed, args.write_tissue_masks,
                        layout=args.layout)
    print(f"wrote {args.slides} {args.layout} synthetic slides and {manifest}")
    return 0
