"""QuPath GeoJSON annotations: parsing them and rasterising chosen classes on any window of a tiling grid.

`Annotations.read` parses a QuPath (v0.2 to v0.5) export: a FeatureCollection, a list of Features or one
Feature. Every Polygon and MultiPolygon (also inside a GeometryCollection) is kept whatever the feature's
`objectType` (annotation, detection, cell, tile); Points, LineStrings and other non-area geometries are
skipped and counted (`skipped`). A feature's class is `properties.classification.name`, a derived class
written as `names` joined with ": " (as QuPath shows it), a plain string, or None when unclassified.
`Annotations.mask` selects classes onto a grid; `AnnotationMask.read` rasterises one window of it.

Definitions:
- Coordinates are level-0 pixels, x right, y down; level-0 pixel (row i, col j) covers [j, j+1) x [i, i+1).
- The grid has square pixels of `scale` level-0 pixels; grid pixel (i, j) has its centre at level-0
  (cx, cy) = ((j + 0.5) * scale, (i + 0.5) * scale), computed in float64 exactly so.
- A polygon is inside by the even-odd rule over all its rings (exterior and holes): for a valid polygon,
  inside the exterior and not inside a hole. A MultiPolygon is the union of its polygons; the mask is the
  union of all polygons of the selected classes (overlaps stay inside).
- Half-open scanline rule: an edge (x0, y0)-(x1, y1) crosses row centre cy when min(y0, y1) <= cy <
  max(y0, y1), at x = x0 + (cy - y0) * (x1 - x0) / (y1 - y0) (horizontal edges never cross). A centre is
  inside a polygon when an odd number of its crossings on that row have x > cx; with the crossings sorted,
  that is x[2k] <= cx < x[2k+1] for some k. Each crossing depends only on its edge and global row, so a
  window is exactly the crop of the whole grid.
- Rings need not repeat their first point at the end: every ring is closed (last point back to first).

Cost: `AnnotationMask` keeps each edge once (float64 x0, y0, x1, y1 at level 0, the grid rows it crosses,
its polygon) and an index of 64-row buckets listing the edges that cross them. A window takes only the
edges in its rows' buckets, of polygons whose bounding box meets it, and pairs their crossings per row and
polygon: about O(crossings + h * w) time, memory bounded per bucket. Windows must lie inside the grid.
Errors (one-line `SlideError`s naming the file): unreadable file, invalid JSON (line and column), not
GeoJSON, a ring with fewer than 3 distinct or non-finite points (naming the feature), no polygon of the
selected classes (naming the classes present).
"""
from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from gerne_jax.slides.manifest import SlideError

_AREA_TYPES = ("Polygon", "MultiPolygon")
_SKIPPED_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")
# Grid rows per bucket of the row index: a window looks only at the edges listed in the buckets of its rows.
_BUCKET_ROWS = 64


class Annotations:
    """The polygons of one GeoJSON file, each with its class name (None: unclassified)."""

    def __init__(self, slide_id: str, file: pathlib.Path, polygons: list[tuple[str | None, list[np.ndarray]]],
                 skipped: dict[str, int]):
        self.slide_id, self.file = slide_id, file
        self.polygons = polygons  # (class, rings as (n, 2) float64 [x, y] arrays), exterior first
        self.skipped = skipped    # geometry type ("null": a feature without one) -> geometries skipped

    @classmethod
    def read(cls, slide_id: str, file: pathlib.Path) -> Annotations:
        """Parses and checks `file`; SlideError (one line naming the file) if it is not usable GeoJSON."""
        try:
            with open(file, encoding="utf-8-sig") as handle:
                document = json.load(handle)
        except json.JSONDecodeError as error:
            raise SlideError(slide_id, file, f"not valid JSON: {error.msg} at line {error.lineno} column "
                             f"{error.colno}") from error
        except UnicodeDecodeError as error:
            raise SlideError(slide_id, file, f"not valid JSON: not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from error
        except OSError as error:
            raise SlideError(slide_id, file, f"cannot read annotations: {error}") from error
        polygons: list[tuple[str | None, list[np.ndarray]]] = []
        skipped: dict[str, int] = {}
        for index, feature in enumerate(_features(slide_id, file, document)):
            name = _class_name(slide_id, file, index, feature.get("properties"))
            geometry = feature.get("geometry")
            for kind, coordinates in _area_parts(slide_id, file, index, geometry, skipped):
                parts = [coordinates] if kind == "Polygon" else _as_list(slide_id, file, index, coordinates)
                for part in parts:
                    rings = [_ring(slide_id, file, index, ring) for ring in _as_list(slide_id, file, index, part)]
                    if rings:  # an empty polygon is valid GeoJSON and covers nothing
                        polygons.append((name, rings))
        return cls(slide_id, file, polygons, skipped)

    @property
    def class_counts(self) -> dict[str | None, int]:
        """Polygons per class name (a MultiPolygon counts each of its polygons)."""
        counts: dict[str | None, int] = {}
        for name, _ in self.polygons:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def mask(self, classes: Sequence[str], scale: float, shape: tuple[int, int], *,
             option: str = "--tumour-classes") -> AnnotationMask:
        """The polygons of `classes` on a grid of `shape` pixels of `scale` level-0 pixels; SlideError if none.

        `option` is the command-line option the error message tells the user to fix.
        """
        wanted = set(classes)
        chosen = [rings for name, rings in self.polygons if name in wanted]
        if not chosen:
            counts = self.class_counts
            present = sorted(name for name in counts if name is not None)
            unclassified = f" and {counts[None]} unclassified" if None in counts else ""
            raise SlideError(self.slide_id, self.file, f"no polygon of class(es) {list(classes)} (classes present: "
                             f"{present}{unclassified}; give {option} with the names as QuPath shows them)")
        return AnnotationMask(chosen, scale, shape)


class AnnotationMask:
    """Polygons rasterised window by window on a grid of `shape` pixels of `scale` level-0 pixels."""

    def __init__(self, polygons: list[list[np.ndarray]], scale: float, shape: tuple[int, int]):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.scale, self.shape = float(scale), (int(shape[0]), int(shape[1]))
        height, width = self.shape
        all_rings = [ring for rings in polygons for ring in rings]
        ring_sizes = np.array([len(ring) for ring in all_rings])
        polygon_sizes = np.array([sum(len(ring) for ring in rings) for rings in polygons])
        points = np.concatenate(all_rings)
        # Edge k of a ring joins its points k and k + 1 (the last point joins the first).
        following = np.arange(1, len(points) + 1)
        following[np.cumsum(ring_sizes) - 1] = np.cumsum(ring_sizes) - ring_sizes
        (x0, y0), (x1, y1) = points.T, points[following].T
        owner = np.repeat(np.arange(len(polygons)), polygon_sizes)
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # Grid rows an edge crosses: [first row, end row) of the centres in [lo, hi).
        first, end = self._first_index(lo, height), self._first_index(hi, height)
        keep = first < end
        self._x0, self._y0, self._x1, self._y1 = x0[keep], y0[keep], x1[keep], y1[keep]
        self._first, self._end, self._owner = first[keep], end[keep], owner[keep]
        # Per polygon, the grid rows and columns whose centres lie in its bounding box (nothing outside).
        starts = np.cumsum(polygon_sizes) - polygon_sizes
        low, high = np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)  # (x, y) per polygon
        self._rows = np.stack([self._first_index(low[:, 1], height), self._first_index(high[:, 1], height)])
        self._cols = np.stack([self._first_index(low[:, 0], width), self._first_index(high[:, 0], width)])
        self._build_index()

    def _first_index(self, values: np.ndarray, limit: int) -> np.ndarray:
        """Per value v, the least index j in [0, limit] with centre (j + 0.5) * scale >= v (limit if none)."""
        estimate = np.ceil(np.clip(values / self.scale - 0.5, -2.0, limit + 1.0)).astype(np.int64)
        # Division rounds: correct the estimate against the centres themselves, computed as everywhere else.
        estimate -= ((estimate - 1 + 0.5) * self.scale >= values).astype(np.int64)
        estimate += ((estimate + 0.5) * self.scale < values).astype(np.int64)
        return np.clip(estimate, 0, limit)

    def _build_index(self) -> None:
        """Row buckets: bucket b lists the edges crossing some row in [b * _BUCKET_ROWS, (b + 1) * _BUCKET_ROWS)."""
        first_bucket, last_bucket = self._first // _BUCKET_ROWS, (self._end - 1) // _BUCKET_ROWS
        spans = last_bucket - first_bucket + 1
        edges = np.repeat(np.arange(len(spans)), spans)
        buckets = first_bucket[edges] + _ranks(spans)
        order = np.argsort(buckets, kind="stable")
        self._bucket_edges = edges[order]
        num_buckets = -(-self.shape[0] // _BUCKET_ROWS)
        self._bucket_starts = np.concatenate([[0], np.cumsum(np.bincount(buckets, minlength=num_buckets))])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The (h, w) bool mask of grid rows y..y+h, columns x..x+w (a window inside the grid)."""
        if min(y, x, h, w) < 0 or y + h > self.shape[0] or x + w > self.shape[1]:
            raise ValueError(f"window rows {y}..{y + h}, columns {x}..{x + w} outside the grid {self.shape}")
        out = np.zeros((h, w), bool)
        # Only polygons whose bounding box meets the window can paint it; all their crossings on a row count.
        near = ((self._rows[0] < y + h) & (self._rows[1] > y) & (self._cols[0] < x + w) & (self._cols[1] > x))
        if h == 0 or w == 0 or not near.any():
            return out
        for bucket in range(y // _BUCKET_ROWS, (y + h - 1) // _BUCKET_ROWS + 1):
            top = max(y, bucket * _BUCKET_ROWS)
            bottom = min(y + h, (bucket + 1) * _BUCKET_ROWS)
            edges = self._bucket_edges[self._bucket_starts[bucket]:self._bucket_starts[bucket + 1]]
            edges = edges[near[self._owner[edges]]]
            out[top - y:bottom - y] = self._paint(edges, top, bottom, x, w)
        return out

    def _paint(self, edges: np.ndarray, top: int, bottom: int, x: int, w: int) -> np.ndarray:
        """Rows top..bottom, columns x..x+w, from the crossings of `edges` (all edges of the polygons met)."""
        low, high = np.maximum(self._first[edges], top), np.minimum(self._end[edges], bottom)
        counts = np.maximum(high - low, 0)
        edge = np.repeat(edges, counts)
        row = np.repeat(low, counts) + _ranks(counts)
        centre_y = (row + 0.5) * self.scale
        x0, y0 = self._x0[edge], self._y0[edge]
        cross = x0 + (centre_y - y0) * (self._x1[edge] - x0) / (self._y1[edge] - y0)
        # Per row and polygon the crossings come in pairs (closed rings); pair k covers [x[2k], x[2k+1]).
        order = np.lexsort((cross, self._owner[edge], row))
        column = self._first_index(cross[order], self.shape[1])
        row_local = row[order][0::2] - top
        start = np.clip(column[0::2] - x, 0, w)
        stop = np.clip(column[1::2] - x, 0, w)
        size = (bottom - top) * (w + 1)
        change = (np.bincount(row_local * (w + 1) + start, minlength=size)
                  - np.bincount(row_local * (w + 1) + stop, minlength=size))
        return np.cumsum(change.reshape(bottom - top, w + 1), axis=1)[:, :w] > 0


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count in turn (the position of each element of np.repeat(..., counts))."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _features(slide_id: str, file: pathlib.Path, document: object) -> list[dict]:
    """The Features of a FeatureCollection, a list of Features or a single Feature."""
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    elif isinstance(document, list):
        features = document
    else:
        found = f"a JSON object of type {document.get('type')!r}" if isinstance(document, dict) else \
            f"a JSON {type(document).__name__}"
        raise SlideError(slide_id, file, f"not GeoJSON: expected a FeatureCollection, a Feature or a list of "
                         f"Features, found {found}")
    if not isinstance(features, list):
        raise SlideError(slide_id, file, "not GeoJSON: the FeatureCollection has no list of 'features'")
    for index, feature in enumerate(features):
        if not (isinstance(feature, dict) and feature.get("type") == "Feature"):
            raise SlideError(slide_id, file, f"not GeoJSON: feature {index} is not an object of type 'Feature'")
    return features


def _class_name(slide_id: str, file: pathlib.Path, index: int, properties: object) -> str | None:
    classification = properties.get("classification") if isinstance(properties, dict) else None
    if isinstance(classification, dict):
        names = classification.get("names")
        classification = ": ".join(map(str, names)) if isinstance(names, list) else classification.get("name")
    if classification is None or isinstance(classification, str):
        return classification
    raise SlideError(slide_id, file, f"feature {index}: classification {classification!r} is not a class name")


def _area_parts(slide_id: str, file: pathlib.Path, index: int, geometry: object,
                skipped: dict[str, int]) -> list[tuple[str, object]]:
    """(type, coordinates) of the Polygons and MultiPolygons in `geometry`; counts the skipped geometries."""
    if geometry is None:  # GeoJSON's unlocated feature
        skipped["null"] = skipped.get("null", 0) + 1
        return []
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind in _AREA_TYPES:
        return [(kind, geometry.get("coordinates"))]
    if kind == "GeometryCollection":
        members = _as_list(slide_id, file, index, geometry.get("geometries"))
        return [part for member in members for part in _area_parts(slide_id, file, index, member, skipped)]
    if kind in _SKIPPED_TYPES:
        skipped[kind] = skipped.get(kind, 0) + 1
        return []
    raise SlideError(slide_id, file, f"feature {index}: geometry {str(geometry)[:60]!r} is not a GeoJSON geometry")


def _as_list(slide_id: str, file: pathlib.Path, index: int, value: object) -> list:
    if not isinstance(value, list):
        raise SlideError(slide_id, file, f"feature {index}: geometry coordinates are not nested lists "
                         f"(found {type(value).__name__})")
    return value


def _ring(slide_id: str, file: pathlib.Path, index: int, ring: object) -> np.ndarray:
    """A ring as an (n, 2) float64 array of [x, y]; at least 3 distinct, finite points."""
    try:
        points = np.array(_as_list(slide_id, file, index, ring), dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SlideError(slide_id, file, f"feature {index}: a ring is not a list of [x, y] points") from error
    if points.ndim != 2 or points.shape[1] < 2:
        raise SlideError(slide_id, file, f"feature {index}: a ring is not a list of [x, y] points")
    points = points[:, :2]  # a z coordinate, if any, is ignored
    if not np.isfinite(points).all():
        raise SlideError(slide_id, file, f"feature {index}: a ring has non-finite coordinates")
    # At least 3 distinct points: some point differs from the first and from the first that differs from it.
    other = (points != points[0]).any(axis=1)
    if not (other & (points != points[other.argmax()]).any(axis=1)).any():
        raise SlideError(slide_id, file, f"feature {index}: a ring has {1 + other.any()} distinct point(s), "
                         "fewer than 3")
    return points
