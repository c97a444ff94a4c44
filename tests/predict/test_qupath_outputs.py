"""QuPath outputs (`gerne_jax.predict.qupath_outputs`): the pyramidal OME-TIFF read back with tifffile (and
OpenSlide where installed), its levels checked against brute-force numpy (2 x 2 nanmeans, a Python loop
over pixel centres, random level-0 points); the detections against the squares and values given."""
from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ElementTree

import numpy as np
import openslide
import pytest
import tifffile

from gerne_jax.predict import qupath_outputs, slide_outputs

OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def random_map(shape, seed=0, nan_share=0.2):
    rng = np.random.default_rng(seed)
    values = rng.random(shape).astype(np.float32)
    values[rng.random(shape) < nan_share] = np.nan
    return values


def read_levels(path):
    """Every level of series 0; per level its (tile length, tile width, compression) and TIFF resolution;
    the OME-XML; the number of top-level pages."""
    with tifffile.TiffFile(path) as tiff:
        levels = tiff.series[0].levels
        return ([level.asarray() for level in levels],
                [(level.keyframe.tilelength, level.keyframe.tilewidth, level.keyframe.compression)
                 for level in levels], [level.keyframe.resolution for level in levels], tiff.ome_metadata,
                len(tiff.pages))


def ome_pixels(xml):
    return ElementTree.fromstring(xml).find(f"{OME}Image/{OME}Pixels")


@pytest.mark.parametrize("map_pixel", [8, 8 + 4e-7])
def test_integer_map_pixel_writes_the_map_itself_with_its_pixel_size(tmp_path, map_pixel):
    values = random_map((13, 17))  # slide 100 x 130 level-0 pixels: ceil(100 / 8) x ceil(130 / 8)
    path = tmp_path / "probability.ome.tif"
    written = qupath_outputs.write_probability_ome_tiff(path, values, map_pixel, (100, 130), 0.25, {"slide_id": "s"})
    assert written == {"level0_pixels_per_pixel": 8, "shape": [13, 17], "levels": 1, "mpp": 2.0}
    levels, layouts, resolutions, xml, pages = read_levels(path)
    assert len(levels) == 1 and pages == 1
    assert resolutions[0] == pytest.approx((1e4 / 2.0, 1e4 / 2.0))  # pixels per cm at 2 µm per pixel
    assert levels[0].dtype == np.float32
    np.testing.assert_array_equal(levels[0], values)  # NaN where values are NaN, equal elsewhere
    assert layouts == [(256, 256, tifffile.COMPRESSION.ADOBE_DEFLATE)]
    pixels = ome_pixels(xml)
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(8 * 0.25)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(8 * 0.25)
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("Type") == "float"
    assert [channel.get("Name") for channel in pixels.findall(f"{OME}Channel")] == ["tumour_probability"]
    description = json.loads(ElementTree.fromstring(xml).find(f"{OME}Image/{OME}Description").text)
    assert description["slide_id"] == "s" and description["level0_pixels_per_pixel"] == 8


def brute_force_halve(level):
    """Pads to even sides with NaN and takes numpy's nanmean of each 2 x 2 block, in float64."""
    rows, cols = level.shape
    padded = np.full((rows + rows % 2, cols + cols % 2), np.nan)
    padded[:rows, :cols] = level
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmean(blocks, axis=(1, 3))


def test_pyramid_levels_are_2x2_nanmeans_down_to_1024_pixels(tmp_path):
    values = random_map((2101, 3001), seed=1, nan_share=0.5)
    values[:40, :40] = np.nan  # whole blocks without a patch
    path = tmp_path / "probability.ome.tif"
    written = qupath_outputs.write_probability_ome_tiff(path, values, 1.0, values.shape, None)
    levels, layouts, resolutions, xml, pages = read_levels(path)
    assert written["levels"] == len(levels) == 3 and written["mpp"] is None
    assert resolutions == [(1.0, 1.0), (0.5, 0.5), (0.25, 0.25)]  # unit NONE: 1 / level-0 pixels per pixel
    assert pages == 1  # the reduced levels are SubIFDs of the one top-level image
    np.testing.assert_array_equal(levels[0], values)
    for previous, level in zip(levels, levels[1:]):
        assert level.shape == (math.ceil(previous.shape[0] / 2), math.ceil(previous.shape[1] / 2))
        np.testing.assert_allclose(level, brute_force_halve(previous), rtol=1e-7, equal_nan=True)
    assert np.isnan(levels[1][:20, :20]).all()
    assert max(levels[-1].shape) <= 1024 < max(levels[-2].shape)
    assert layouts == [(256, 256, tifffile.COMPRESSION.ADOBE_DEFLATE)] * 3
    pixels = ome_pixels(xml)
    assert pixels.get("PhysicalSizeX") is None and pixels.get("PhysicalSizeY") is None


@pytest.mark.parametrize(("map_pixel", "k", "slide_shape"), [(2.5, 2, (101, 77)), (3.7, 3, (50, 61)),
                                                             (0.6, 1, (20, 30))])
def test_non_integer_map_pixel_takes_the_map_pixel_under_each_centre(tmp_path, map_pixel, k, slide_shape):
    values = random_map((math.ceil(slide_shape[0] / map_pixel), math.ceil(slide_shape[1] / map_pixel)), seed=2)
    path = tmp_path / "probability.ome.tif"
    written = qupath_outputs.write_probability_ome_tiff(path, values, map_pixel, slide_shape, 0.5)
    assert written["level0_pixels_per_pixel"] == k and written["mpp"] == pytest.approx(k * 0.5)
    level0 = tifffile.imread(path)
    assert level0.shape == (math.ceil(slide_shape[0] / k), math.ceil(slide_shape[1] / k))
    expected = np.full(level0.shape, np.nan, np.float32)
    for i in range(level0.shape[0]):
        for j in range(level0.shape[1]):
            row, col = math.floor((i + .5) * k / map_pixel), math.floor((j + .5) * k / map_pixel)
            if row < values.shape[0] and col < values.shape[1]:
                expected[i, j] = values[row, col]
    np.testing.assert_array_equal(level0, expected)
    assert float(ome_pixels(tifffile.TiffFile(path).ome_metadata).get("PhysicalSizeX")) == pytest.approx(k * 0.5)


def test_each_level0_point_reads_the_map_pixel_containing_it(tmp_path):
    map_pixel, slide_shape = 8, (100, 130)
    values = random_map((11, 20), seed=3)  # 2 rows short of the slide (NaN-padded), 3 columns over (cropped)
    path = tmp_path / "probability.ome.tif"
    written = qupath_outputs.write_probability_ome_tiff(path, values, map_pixel, slide_shape, None)
    k = written["level0_pixels_per_pixel"]
    level0 = tifffile.imread(path)
    assert level0.shape == (13, 17)
    rng = np.random.default_rng(4)
    for py, px in zip(rng.uniform(0, slide_shape[0], 500), rng.uniform(0, slide_shape[1], 500)):
        row, col = int(py / map_pixel), int(px / map_pixel)
        expected = values[row, col] if row < values.shape[0] else np.nan
        np.testing.assert_array_equal(level0[int(py // k), int(px // k)], expected)


def test_openslide_opens_it_with_its_size_and_pixel_size(tmp_path):
    path = tmp_path / "probability.ome.tif"
    qupath_outputs.write_probability_ome_tiff(path, random_map((13, 17)), 8, (100, 130), 0.25)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions[0] == (17, 13)  # (width, height)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(2.0)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(2.0)


def test_rewriting_the_same_map_gives_the_same_bytes(tmp_path):
    values = random_map((1300, 170), seed=5)
    for name in ("a.ome.tif", "b.ome.tif"):
        qupath_outputs.write_probability_ome_tiff(tmp_path / name, values, 8, (10400, 1360), 0.25, {"slide_id": "s"})
    assert (tmp_path / "a.ome.tif").read_bytes() == (tmp_path / "b.ome.tif").read_bytes()
    resolutions = read_levels(tmp_path / "a.ome.tif")[2]  # pixels per cm at 2 and 4 µm per pixel
    assert resolutions == [pytest.approx((1e4 / 2.0, 1e4 / 2.0)), pytest.approx((1e4 / 4.0, 1e4 / 4.0))]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_patch_detections_are_the_patch_squares_with_their_measurements(tmp_path):
    rng = np.random.default_rng(6)
    n, size = 50, 109.75
    x = rng.integers(0, 10_000, n).astype(np.float64) + np.round(rng.random(n), 4)
    y = rng.integers(0, 10_000, n)
    probability = rng.random(n).astype(np.float32)
    probability[0] = 0.83
    tissue = rng.random(n).astype(np.float32)
    collection = qupath_outputs.patch_detections(x, y, size, probability, {"tissue_ratio": tissue})
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == n
    for i, feature in enumerate(collection["features"]):
        x0, y0, x1, y1 = round(float(x[i]), 3), float(y[i]), round(float(x[i]) + size, 3), float(y[i]) + size
        assert feature["geometry"] == {"type": "Polygon",
                                       "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
        properties = feature["properties"]
        assert properties["objectType"] == "detection" and "id" not in feature
        assert np.float32(properties["measurements"]["tumour_probability"]) == probability[i]
        assert np.float32(properties["measurements"]["tissue_ratio"]) == tissue[i]
    text = json.dumps(collection)
    assert json.loads(text) == collection
    assert '"tumour_probability": 0.83,' in text  # the float32 0.83 written as the shortest decimal
    for name in ("a.geojson", "b.geojson"):
        slide_outputs.write_geojson(tmp_path / name, qupath_outputs.patch_detections(
            x, y, size, probability, {"tissue_ratio": tissue}))
    assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


def test_patch_detections_reject_values_geojson_cannot_hold():
    with pytest.raises(ValueError, match="tumour_probability"):
        qupath_outputs.patch_detections(np.zeros(2), np.zeros(2), 8, np.array([0.5, np.nan], np.float32))
    with pytest.raises(ValueError, match="tissue_ratio"):
        qupath_outputs.patch_detections(np.zeros(2), np.zeros(2), 8, np.zeros(2), {"tissue_ratio": np.zeros(3)})
