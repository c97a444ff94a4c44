"""QuPath GeoJSON annotations: parsing, errors, and rasterising against independent references.

References: matplotlib's `Path.contains_points` on random polygons, rectangles painted with numpy for
axis-aligned polygons, and an exact (fractions) brute force of the half-open crossing rule where centres
lie on edges.
"""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from matplotlib.path import Path

from gerne_jax.slides.annotations import Annotations
from gerne_jax.slides.manifest import SlideError

GRID = (120, 150)


def feature(geometry: dict, name: str | None = None, object_type: str = "annotation") -> dict:
    properties: dict = {"objectType": object_type}
    if name is not None:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polygon(*rings: np.ndarray) -> dict:
    return {"type": "Polygon", "coordinates": [closed(ring).tolist() for ring in rings]}


def closed(ring: np.ndarray) -> np.ndarray:
    return np.vstack([ring, ring[:1]])  # GeoJSON repeats the first point


def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def write(tmp_path, document, name: str = "slide.geojson"):
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def star(rng, centre: np.ndarray, radius_low: float, radius_high: float, n: int) -> np.ndarray:
    """A star-shaped simple polygon around `centre`: gaps between angles below 1.8 * 2 pi / n."""
    angles = (np.arange(n) + rng.uniform(0, 0.8, n)) * 2 * np.pi / n
    radii = rng.uniform(radius_low, radius_high, n)
    return centre + np.c_[radii * np.cos(angles), radii * np.sin(angles)]


def random_polygons(rng, extent: tuple[float, float]) -> list[list[np.ndarray]]:
    """Stars (some partly off the grid) with 0-2 disjoint holes inside (the star reaches >= 0.76 * low)."""
    size = min(extent)
    polygons = []
    for _ in range(int(rng.integers(3, 6))):
        centre = rng.uniform(-0.1, 1.1, 2) * np.array(extent[::-1])
        low = rng.uniform(0.1, 0.25) * size
        rings = [star(rng, centre, low, 1.6 * low, int(rng.integers(8, 20)))]
        for k in range(int(rng.integers(0, 3))):  # disjoint: centres 0.6 * low apart, radii below 0.25 * low
            offset = np.array([0.3 * low * (2 * k - 1), 0.0])
            rings.append(star(rng, centre + offset, 0.05 * low, 0.25 * low, int(rng.integers(3, 9))))
        polygons.append(rings)
    return polygons


def matplotlib_mask(polygons: list[list[np.ndarray]], scale: float, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.c_[(cols.ravel() + 0.5) * scale, (rows.ravel() + 0.5) * scale]
    mask = np.zeros(len(centres), bool)
    for exterior, *holes in polygons:
        inside = Path(closed(exterior)).contains_points(centres)
        for hole in holes:
            inside &= ~Path(closed(hole)).contains_points(centres)
        mask |= inside
    return mask.reshape(shape)


def random_windows(rng, shape: tuple[int, int], count: int = 25):
    for _ in range(count):
        y, x = int(rng.integers(0, shape[0] + 1)), int(rng.integers(0, shape[1] + 1))
        yield y, x, int(rng.integers(0, shape[0] - y + 1)), int(rng.integers(0, shape[1] - x + 1))


@pytest.mark.parametrize("scale", [1.0, 2.5, 4.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_polygons_match_matplotlib_on_grid_and_windows(tmp_path, scale, seed):
    rng = np.random.default_rng(seed)
    extent = (GRID[0] * scale, GRID[1] * scale)
    tumour, other = random_polygons(rng, extent), random_polygons(rng, extent)
    # Tumour polygons go as single Polygons and as one MultiPolygon of two (overlapping ones stay inside).
    features = [feature(polygon(*rings), "Tumor") for rings in tumour[2:]]
    features.append(feature({"type": "MultiPolygon", "coordinates": [polygon(*rings)["coordinates"]
                                                                      for rings in tumour[:2]]}, "Tumor"))
    features += [feature(polygon(*rings), "Stroma") for rings in other]
    annotations = Annotations.read("s1", write(tmp_path, {"type": "FeatureCollection", "features": features}))
    assert annotations.class_counts == {"Tumor": len(tumour), "Stroma": len(other)}

    expected = matplotlib_mask(tumour, scale, GRID)
    assert 0 < expected.sum() < expected.size  # the case is not trivial
    mask = annotations.mask(["Tumor"], scale, GRID)
    whole = mask.read(0, 0, *GRID)
    assert whole.dtype == bool and whole.shape == GRID
    np.testing.assert_array_equal(whole, expected)
    for y, x, h, w in random_windows(rng, GRID):
        np.testing.assert_array_equal(mask.read(y, x, h, w), expected[y:y + h, x:x + w])
    both = annotations.mask(["Tumor", "Stroma"], scale, GRID).read(0, 0, *GRID)
    np.testing.assert_array_equal(both, expected | matplotlib_mask(other, scale, GRID))


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_axis_aligned_polygons_equal_the_painted_rectangles(tmp_path, scale):
    shape = (60, 80)
    painted = np.zeros(shape, bool)
    # An L-shape (rows 5..25 x cols 10..60, rows 25..50 x cols 10..30) with a hole (rows 30..45, cols 15..25).
    painted[5:25, 10:60] = True
    painted[25:50, 10:30] = True
    painted[30:45, 15:25] = False
    l_shape = np.array([[10, 5], [60, 5], [60, 25], [30, 25], [30, 50], [10, 50]], float)
    # A staircase MultiPolygon piece and a rectangle sharing an edge with it (no gap between them).
    painted[10:40, 65:70] = True
    painted[20:40, 70:75] = True
    painted[30:40, 75:80] = True
    stairs = np.array([[65, 10], [70, 10], [70, 20], [75, 20], [75, 30], [80, 30], [80, 40], [65, 40]], float)
    painted[52:60, 0:65] = True
    painted[40:52, 40:65] = True
    features = [
        feature(polygon(l_shape * scale, rectangle(15, 30, 25, 45) * scale), "Tumor"),
        feature({"type": "MultiPolygon", "coordinates": [polygon(stairs * scale)["coordinates"],
                                                         polygon(rectangle(0, 52, 65, 60) * scale)["coordinates"]]},
                "Tumor"),
        feature(polygon(rectangle(40, 40, 65, 52) * scale), "Tumor"),
    ]
    annotations = Annotations.read("s1", write(tmp_path, {"type": "FeatureCollection", "features": features}))
    mask = annotations.mask(["Tumor"], float(scale), shape)
    np.testing.assert_array_equal(mask.read(0, 0, *shape), painted)
    for y, x, h, w in random_windows(np.random.default_rng(scale), shape):
        np.testing.assert_array_equal(mask.read(y, x, h, w), painted[y:y + h, x:x + w])


def test_centres_on_a_rectangle_boundary_follow_the_half_open_rule(tmp_path):
    # Edges through centres: x = 0.5 and y = 0.5 count, x = 2.5 and y = 3.5 do not (hand-derived).
    document = feature(polygon(rectangle(0.5, 0.5, 2.5, 3.5)), "Tumor")
    mask = Annotations.read("s1", write(tmp_path, document)).mask(["Tumor"], 1.0, (5, 5))
    expected = np.zeros((5, 5), bool)
    expected[0:3, 0:2] = True
    np.testing.assert_array_equal(mask.read(0, 0, 5, 5), expected)


@pytest.mark.parametrize("scale, first, stop", [(0.3, 3, 30), (0.1, 14, 31), (2.2, 31, 60)])
def test_vertices_on_float_centres_follow_the_half_open_rule(tmp_path, scale, first, stop):
    # Corners at the float centres (j + 0.5) * scale of j = first and stop, chosen where dividing by the
    # scale does not give back j + 0.5: rows / columns first..stop-1 are inside, stop is not.
    low, high = (first + 0.5) * scale, (stop + 0.5) * scale
    document = feature(polygon(rectangle(low, low, high, high)), "Tumor")
    mask = Annotations.read("s1", write(tmp_path, document)).mask(["Tumor"], scale, (70, 70))
    expected = np.zeros((70, 70), bool)
    expected[first:stop, first:stop] = True
    np.testing.assert_array_equal(mask.read(0, 0, 70, 70), expected)


def exact_inside(polygons: list[list[np.ndarray]], scale: float, shape: tuple[int, int]) -> np.ndarray:
    """The documented rule in exact rationals: per polygon, odd count of crossings right of the centre."""
    out = np.zeros(shape, bool)
    for i in range(shape[0]):
        cy = Fraction(2 * i + 1, 2) * Fraction(scale)
        for j in range(shape[1]):
            cx = Fraction(2 * j + 1, 2) * Fraction(scale)
            for rings in polygons:
                count = 0
                for ring in rings:
                    points = [(Fraction(px), Fraction(py)) for px, py in ring]
                    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
                        if min(y0, y1) <= cy < max(y0, y1) and x0 + (cy - y0) * (x1 - x0) / (y1 - y0) > cx:
                            count += 1
                out[i, j] |= count % 2 == 1
    return out


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_centres_on_edges_match_an_exact_brute_force_and_windows_agree(tmp_path, scale):
    rng = np.random.default_rng(7)
    shape = (14, 17)
    # Vertices on a lattice of scale / 2 put many centres exactly on edges and vertices.
    polygons = [[rng.integers(-2, 2 * max(shape) + 2, (int(rng.integers(3, 8)), 2)) * (scale / 2)]
                for _ in range(4)]
    polygons.append([rectangle(0, 0, 10, 10) * scale, rectangle(2, 2, 6, 6) * scale + 0.25 * scale])
    features = [feature(polygon(*rings), "Tumor") for rings in polygons]
    annotations = Annotations.read("s1", write(tmp_path, features))
    mask = annotations.mask(["Tumor"], scale, shape)
    expected = exact_inside(polygons, scale, shape)
    np.testing.assert_array_equal(mask.read(0, 0, *shape), expected)
    for y, x, h, w in random_windows(rng, shape, count=40):
        np.testing.assert_array_equal(mask.read(y, x, h, w), expected[y:y + h, x:x + w])


def test_window_outside_every_polygon_and_windows_outside_the_grid(tmp_path):
    document = feature(polygon(rectangle(10, 10, 20, 20)), "Tumor")
    mask = Annotations.read("s1", write(tmp_path, document)).mask(["Tumor"], 1.0, (200, 300))
    assert mask.shape == (200, 300)
    assert not mask.read(100, 150, 100, 150).any()
    assert mask.read(0, 0, 30, 30).sum() == 100
    for window in [(-1, 0, 5, 5), (0, 0, 201, 5), (0, 298, 5, 3)]:
        with pytest.raises(ValueError, match="outside the grid"):
            mask.read(*window)


QUPATH_EXPORT = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "1d3c9a4e-8f0b-4c33-9a57-2b7e4f6c1a10",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [
            [12.5, 8],
            [40, 8],
            [40, 30.25],
            [12.5, 30.25],
            [12.5, 8]
          ]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {
          "name": "Tumor",
          "color": [200, 0, 0]
        },
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "6a1f2c55-03d8-4e6b-b1a9-0c9d7e3f5b22",
      "geometry": {
        "type": "Polygon",
        "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Stroma", "color": [150, 200, 150]}
      }
    }
  ]
}
"""


def test_a_qupath_export_gives_its_tumour_rectangle(tmp_path):
    annotations = Annotations.read("s1", write(tmp_path, QUPATH_EXPORT))
    assert annotations.class_counts == {"Tumor": 1, "Stroma": 1}
    # At scale 2 the centres 2j + 1 in [12.5, 40) are j = 6..19; 2i + 1 in [8, 30.25) are i = 4..14.
    expected = np.zeros((25, 25), bool)
    expected[4:15, 6:20] = True
    np.testing.assert_array_equal(annotations.mask(["Tumor"], 2.0, (25, 25)).read(0, 0, 25, 25), expected)


def test_feature_collection_list_and_single_feature_are_read_alike(tmp_path):
    square = feature(polygon(rectangle(2, 3, 9, 7)), "Tumor")
    expected = np.zeros((12, 12), bool)
    expected[3:7, 2:9] = True
    for index, document in enumerate([{"type": "FeatureCollection", "features": [square]}, [square], square]):
        annotations = Annotations.read("s1", write(tmp_path, document, f"{index}.geojson"))
        assert annotations.class_counts == {"Tumor": 1}
        np.testing.assert_array_equal(annotations.mask(["Tumor"], 1.0, (12, 12)).read(0, 0, 12, 12), expected)


def test_classifications_object_types_geometry_collections_and_skipped_geometries(tmp_path):
    features = [
        {"type": "Feature", "geometry": polygon(rectangle(0, 0, 4, 4)),
         "properties": {"objectType": "detection", "classification": "Tumor"}},  # classification as a string
        {"type": "Feature", "geometry": polygon(rectangle(6, 0, 8, 2)),
         "properties": {"objectType": "cell", "classification": {"names": ["Tumor", "Positive"]}}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [
            polygon(rectangle(0, 6, 2, 8)),
            {"type": "Point", "coordinates": [5, 5]},
            {"type": "MultiPolygon", "coordinates": [polygon(rectangle(4, 6, 5, 7))["coordinates"],
                                                     polygon(rectangle(6, 6, 7, 7))["coordinates"]]}]},
         "properties": {"objectType": "tile", "classification": {"name": "Tumor"}}},
        feature({"type": "Point", "coordinates": [1, 1]}, "Tumor"),
        feature({"type": "LineString", "coordinates": [[1, 1], [3, 3]]}, "Tumor"),
        {"type": "Feature", "geometry": polygon(rectangle(8, 8, 10, 10)), "properties": {}},  # unclassified
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    annotations = Annotations.read("s1", write(tmp_path, {"type": "FeatureCollection", "features": features}))
    assert annotations.class_counts == {"Tumor": 4, "Tumor: Positive": 1, None: 1}
    assert annotations.skipped == {"Point": 2, "LineString": 1, "null": 1}
    expected = np.zeros((10, 10), bool)
    expected[0:4, 0:4] = expected[6:8, 0:2] = expected[6, 4] = expected[6, 6] = True
    np.testing.assert_array_equal(annotations.mask(["Tumor"], 1.0, (10, 10)).read(0, 0, 10, 10), expected)
    expected[0:2, 6:8] = True
    both = annotations.mask(["Tumor", "Tumor: Positive"], 1.0, (10, 10)).read(0, 0, 10, 10)
    np.testing.assert_array_equal(both, expected)


def error_of(tmp_path, document) -> str:
    path = write(tmp_path, document)
    with pytest.raises(SlideError) as caught:
        Annotations.read("s1", path)
    message = str(caught.value)
    assert str(path) in message and "'s1'" in message and "\n" not in message
    return message


def test_invalid_json_names_line_and_column(tmp_path):
    text = '{"type": "FeatureCollection",\n "features": [\n  {"type": "Feature",,}\n]}'
    message = error_of(tmp_path, text)
    assert "not valid JSON" in message and "line 3 column 22" in message


@pytest.mark.parametrize("document", [{"type": "Polygon", "coordinates": []}, 42, {"features": []},
                                      [{"type": "Polygon", "coordinates": []}]])
def test_not_geojson(tmp_path, document):
    assert "not GeoJSON" in error_of(tmp_path, document)


@pytest.mark.parametrize("ring, problem", [
    ([[0, 0], [5, 5], [0, 0], [5, 5]], "2 distinct point(s)"),
    ([[0, 0], [5, float("nan")], [5, 5], [0, 0]], "non-finite"),
    ([[0, 0], [5, 0], [5, "x"], [0, 0]], "not a list of [x, y] points"),
])
def test_bad_rings_name_the_feature(tmp_path, ring, problem):
    good = feature(polygon(rectangle(0, 0, 4, 4)), "Tumor")
    bad = feature({"type": "Polygon", "coordinates": [ring]}, "Tumor")
    message = error_of(tmp_path, {"type": "FeatureCollection", "features": [good, bad]})
    assert "feature 1" in message and problem in message


def test_unknown_class_names_the_classes_present(tmp_path):
    features = [feature(polygon(rectangle(0, 0, 4, 4)), name) for name in ["Tumour", "Stroma", "Tumour", None]]
    path = write(tmp_path, features)
    annotations = Annotations.read("s1", path)
    with pytest.raises(SlideError) as caught:
        annotations.mask(["Tumor"], 1.0, (8, 8))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert ("no polygon of class(es) ['Tumor'] (classes present: ['Stroma', 'Tumour'] and 1 unclassified; "
            "give --tumour-classes with the names as QuPath shows them)") in message
    with pytest.raises(SlideError, match="give --tissue-classes"):
        annotations.mask(["Tissue"], 1.0, (8, 8), option="--tissue-classes")
