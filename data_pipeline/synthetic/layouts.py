"""The layout of a synthetic slide: its size, shapes, kinds of tissue and noise keys, sampled once.

`sample_layout` draws a `SlideLayout` from (seed, slide index, nominal size, layout name): bodies of
tissue with their tumour regions (`Body`, each an outline `Shape`), the `Texture` of each kind of
tissue, the noise keys of the slide and its domain warp. The order of the draws fixes every random
stream, so the same arguments always give the same layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from gerne_jax.core.errors import InputError

SIZE_SHRINK = 0.08  # slide sides vary between 92% and 100% of --size
LAYOUTS = ("classic", "sections")

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
