"""`physical.tiff_pixel_size` and `check_mpp` against files written in tmp_path with tifffile and Pillow.

Every expected size is worked out by hand in the test from what was written (a unit's microns times the
stated size, or microns per resolution unit over pixels per unit); the reasons by the value they name.
The Aperio SVS written by `tests.tiff_layouts.write_aperio_svs` is also read back through `SlideReader`.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from gerne_jax.core.errors import InputError
from gerne_jax.slides.manifest import SlideSpec
from gerne_jax.slides.physical import NO_PIXEL_SIZE, PixelSize, check_mpp, tiff_pixel_size
from gerne_jax.slides.reader import SlideReader
from tests.tiff_layouts import pyramid_levels, random_image, write_aperio_svs

PLANES = np.arange(2 * 24 * 32, dtype=np.uint8).reshape(2, 24, 32)  # (C, Y, X)


def pixel_size_of(path) -> PixelSize | str:
    with tifffile.TiffFile(path) as tiff:
        return tiff_pixel_size(tiff)


def write_ome(path, **physical):
    tifffile.imwrite(path, PLANES, ome=True, photometric="minisblack", metadata={"axes": "CYX", **physical})
    return path


# -- OME ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("physical, expected", [
    (dict(PhysicalSizeX=0.325, PhysicalSizeXUnit="µm", PhysicalSizeY=0.325, PhysicalSizeYUnit="µm"), 0.325),
    (dict(PhysicalSizeX=250, PhysicalSizeXUnit="nm", PhysicalSizeY=250, PhysicalSizeYUnit="nm"), 250 / 1000),
    (dict(PhysicalSizeX=0.0005, PhysicalSizeXUnit="mm", PhysicalSizeY=0.0005, PhysicalSizeYUnit="mm"), 0.5),
    # units that differ between x and y, and the micro sign written as Greek mu (U+03BC)
    (dict(PhysicalSizeX=0.00025, PhysicalSizeXUnit="mm", PhysicalSizeY=0.25, PhysicalSizeYUnit="\u03bcm"), 0.25),
    (dict(PhysicalSizeX=2500, PhysicalSizeXUnit="Å", PhysicalSizeY=2500, PhysicalSizeYUnit="Å"), 2500 / 10000),
    (dict(PhysicalSizeX=1e-5, PhysicalSizeXUnit="in", PhysicalSizeY=1e-5, PhysicalSizeYUnit="in"), 1e-5 * 25400),
    (dict(PhysicalSizeX=0.4), 0.4),  # no unit attribute: OME's default, µm; no PhysicalSizeY: takes x
])
def test_ome_physical_size_in_microns(tmp_path, physical, expected):
    size = pixel_size_of(write_ome(tmp_path / "a.ome.tif", **physical))
    assert isinstance(size, PixelSize), size
    assert size.source == "OME PhysicalSizeX/Y"
    assert size.x == pytest.approx(expected, rel=1e-12)
    assert size.y == pytest.approx(expected, rel=1e-12)
    assert size.mpp == size.x


@pytest.mark.parametrize("unit, microns_per_unit", [
    ("m", 1e6), ("dm", 1e5), ("cm", 1e4), ("mm", 1e3), ("um", 1.0), ("micron", 1.0), ("nm", 1e-3), ("pm", 1e-6),
    ("\u212b", 1e-4), ("thou", 25.4), ("ft", 12 * 25400.0)])  # U+212B: the Angstrom sign, not the letter Å
def test_ome_length_units(tmp_path, unit, microns_per_unit):
    size = pixel_size_of(write_ome(tmp_path / "a.ome.tif", PhysicalSizeX=0.5 / microns_per_unit,
                                   PhysicalSizeXUnit=unit))
    assert size.mpp == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("physical, phrases", [
    (dict(PhysicalSizeX=1, PhysicalSizeXUnit="pixel"), ["OME PhysicalSizeX", "'pixel'", "not a physical unit"]),
    (dict(PhysicalSizeX=1, PhysicalSizeXUnit="reference frame"), ["'reference frame'", "not a physical unit"]),
    (dict(PhysicalSizeX=0.5, PhysicalSizeY=1, PhysicalSizeYUnit="furlong"), ["PhysicalSizeY", "'furlong'"]),
    (dict(PhysicalSizeX=0), ["OME PhysicalSizeX is 0 (must be > 0)"]),
    (dict(PhysicalSizeX=0.5, PhysicalSizeY=-0.5), ["OME PhysicalSizeY is -0.5 (must be > 0)"]),
    (dict(PhysicalSizeX=0.25, PhysicalSizeY=0.5), ["anisotropic pixels x=0.25, y=0.5 µm"]),
])
def test_ome_unusable_size_gives_reason(tmp_path, physical, phrases):
    reason = pixel_size_of(write_ome(tmp_path / "a.ome.tif", **physical))
    assert isinstance(reason, str)
    for phrase in phrases:
        assert phrase in reason


def test_ome_sizes_within_one_percent_count_as_square(tmp_path):
    size = pixel_size_of(write_ome(tmp_path / "a.ome.tif", PhysicalSizeX=0.5, PhysicalSizeY=0.504))
    assert (size.x, size.y, size.mpp) == (0.5, 0.504, 0.5)


def test_ome_namespace_of_another_schema_version(tmp_path):
    # OME 2013-06 (before units existed: sizes are in µm) in the ImageDescription, written by hand.
    xml = ('<?xml version="1.0" encoding="UTF-8"?>'
           '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2013-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="32" '
           'SizeY="24" SizeC="2" SizeZ="1" SizeT="1" PhysicalSizeX="0.2277" PhysicalSizeY="0.2277">'
           '<Channel ID="Channel:0:0" SamplesPerPixel="1"/><Channel ID="Channel:0:1" SamplesPerPixel="1"/>'
           '<TiffData IFD="0" PlaneCount="2"/></Pixels></Image></OME>')
    path = tmp_path / "old.ome.tif"
    with tifffile.TiffWriter(path) as writer:
        for index, plane in enumerate(PLANES):
            writer.write(plane, photometric="minisblack", metadata=None, description=xml if index == 0 else None)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome
        assert tiff_pixel_size(tiff) == PixelSize(0.2277, 0.2277, "OME PhysicalSizeX/Y")


def test_ome_xml_that_does_not_parse_gives_reason(tmp_path):
    path = tmp_path / "broken.ome.tif"
    tifffile.imwrite(path, PLANES[0], photometric="minisblack", metadata=None,
                     description='<OME><Image><Pixels PhysicalSizeX="0.5"></OME>')
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome
        reason = tiff_pixel_size(tiff)
    assert isinstance(reason, str) and "OME-XML" in reason and "not valid XML" in reason


def test_ome_size_wins_over_resolution_tags(tmp_path):
    path = tmp_path / "both.ome.tif"
    tifffile.imwrite(path, PLANES, ome=True, photometric="minisblack", resolution=(10000 / 0.5, 10000 / 0.5),
                     resolutionunit="CENTIMETER", metadata={"axes": "CYX", "PhysicalSizeX": 0.25})
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tiff_pixel_size(tiff) == PixelSize(0.25, 0.25, "OME PhysicalSizeX/Y")


def test_ome_without_physical_size_falls_back_to_resolution_tags(tmp_path):
    path = tmp_path / "tags.ome.tif"
    tifffile.imwrite(path, PLANES, ome=True, photometric="minisblack", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER", metadata={"axes": "CYX"})
    size = pixel_size_of(path)
    assert (size.x, size.y, size.source) == (1e4 / 20000, 1e4 / 20000, "TIFF resolution tags (centimeter)")


# -- Aperio SVS -----------------------------------------------------------------------------------------------
def svs_image() -> np.ndarray:
    return random_image(np.uint8, shape=(45, 67, 3), seed=3)


def test_aperio_svs_layout_and_mpp(tmp_path):
    image = svs_image()
    path = write_aperio_svs(tmp_path / "slide.svs", image, 0.499, levels=3)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_svs
        assert [level.shape[:2] for level in tiff.series[0].levels] == [
            level.shape[:2] for level in pyramid_levels(image, 3)]
        assert [series.name for series in tiff.series] == ["Baseline", "Thumbnail", "Label", "Macro"]
        # the resolution tags say NONE: the Aperio MPP comes first
        assert tiff.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        assert tiff_pixel_size(tiff) == PixelSize(0.499, 0.499, "Aperio MPP")


def test_aperio_mpp_zero_gives_reason(tmp_path):
    path = write_aperio_svs(tmp_path / "slide.svs", svs_image(), 0, levels=2, label_macro=False)
    assert pixel_size_of(path) == "Aperio MPP is 0 (must be > 0)"


@pytest.mark.parametrize("options, level_index", [
    (dict(), 0), (dict(level=1), 1), (dict(downsample=2), 1), (dict(level=2), 2), (dict(downsample=4), 2)])
def test_slide_reader_reads_aperio_svs(tmp_path, options, level_index):
    image = svs_image()
    path = write_aperio_svs(tmp_path / "slide.svs", image, 0.499, levels=3)
    expected = pyramid_levels(image, 3)[level_index]
    with SlideReader(SlideSpec("svs", (path,), None), **options) as slide:
        assert slide.shape == expected.shape[:2]
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), expected)


# -- ImageJ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit, pixels_per_unit, expected", [
    ("micron", 1 / 0.65, 0.65), ("um", 2.0, 1 / 2), ("\\u00B5m", 4.0, 1 / 4), ("nm", 0.004, 1 / 0.004 / 1000)])
def test_imagej_unit_and_resolution(tmp_path, unit, pixels_per_unit, expected):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, PLANES, imagej=True, photometric="minisblack", resolution=(pixels_per_unit,) * 2,
                     metadata={"axes": "CYX", "unit": unit})
    size = pixel_size_of(path)
    assert isinstance(size, PixelSize), size
    assert size.mpp == pytest.approx(expected, rel=1e-6)  # the tags are rationals of 32-bit integers


def test_imagej_pixel_unit_gives_reason(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, PLANES, imagej=True, photometric="minisblack", metadata={"axes": "CYX", "unit": "pixel"})
    assert pixel_size_of(path) == "ImageJ unit 'pixel' is not a physical unit"


# -- TIFF resolution tags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution, unit, expected, name", [
    ((30000, 30000), "CENTIMETER", 1e4 / 30000, "centimeter"),
    ((101600, 101600), "INCH", 25400 / 101600, "inch"),
    ((2500, 2500), "MILLIMETER", 1e3 / 2500, "millimeter"),
    ((4, 4), "MICROMETER", 1 / 4, "micrometer"),
    ((254, 254), "INCH", 25400 / 254, "inch"),  # exactly 100 µm: the coarsest accepted
])
def test_resolution_tags(tmp_path, resolution, unit, expected, name):
    path = tmp_path / "tags.tif"
    tifffile.imwrite(path, PLANES[0], resolution=resolution, resolutionunit=unit)
    size = pixel_size_of(path)
    assert isinstance(size, PixelSize), size
    assert size.x == size.y == pytest.approx(expected, rel=1e-12)
    assert size.source == f"TIFF resolution tags ({name})"


def test_resolution_tags_without_unit_are_inches(tmp_path):
    # Pillow writes XResolution / YResolution without ResolutionUnit; the TIFF default unit is the inch.
    path = tmp_path / "pillow.tif"
    Image.fromarray(PLANES[0]).save(path, tiffinfo={282: 40000.0, 283: 40000.0})
    with tifffile.TiffFile(path) as tiff:
        assert 296 not in tiff.pages.first.tags
        assert tiff_pixel_size(tiff) == PixelSize(25400 / 40000, 25400 / 40000, "TIFF resolution tags (inch)")


@pytest.mark.parametrize("resolution, unit, stated", [
    ((72, 72), "INCH", "72 dpi"), ((96, 96), "INCH", "96 dpi"), ((150, 150), "INCH", "150 dpi"),
    ((72 / 2.54, 72 / 2.54), "CENTIMETER", "(72 dpi)"),
])
def test_screen_default_resolution_gives_reason(tmp_path, resolution, unit, stated):
    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, PLANES[0], resolution=resolution, resolutionunit=unit)
    reason = pixel_size_of(path)
    assert isinstance(reason, str) and stated in reason and "screen or print default" in reason


def test_tifffile_default_resolution_is_unit_none(tmp_path):
    path = tmp_path / "default.tif"
    tifffile.imwrite(path, PLANES[0])  # tifffile writes XResolution 1/1 with ResolutionUnit NONE
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        assert tiff_pixel_size(tiff) == "the TIFF resolution unit is NONE (not a physical unit)"


def test_no_resolution_tags_gives_reason(tmp_path):
    path = tmp_path / "plain.tif"
    Image.fromarray(PLANES[0]).save(path)  # Pillow writes no resolution tags
    with tifffile.TiffFile(path) as tiff:
        assert not {282, 283, 296} & set(tiff.pages.first.tags.keys())
        assert tiff_pixel_size(tiff) == NO_PIXEL_SIZE


def test_anisotropic_resolution_tags_give_reason(tmp_path):
    path = tmp_path / "tags.tif"
    tifffile.imwrite(path, PLANES[0], resolution=(40000, 20000), resolutionunit="CENTIMETER")
    assert pixel_size_of(path) == ("anisotropic pixels x=0.25, y=0.5 µm (TIFF resolution tags (centimeter)) "
                                   "are not supported")


# -- check_mpp ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, -math.inf, 0.0])
def test_check_mpp_rejects(value):
    with pytest.raises(InputError) as caught:
        check_mpp(value, "--mpp")
    message = str(caught.value)
    assert message.startswith("--mpp: ") and message.endswith(f"got {value!r}")
    assert "positive number of microns per pixel" in message


def test_check_mpp_accepts_positive():
    assert check_mpp(0.5, "--mpp") == 0.5
    assert check_mpp(2, "mpp") == 2.0
