"""OpenSlideFile against generic tiled TIFFs written in tmp_path, checked against the numpy arrays written.

OpenSlide opens a tifffile-written TIFF as a "generic-tiff" pyramid when it is RGB uint8 and tiled, with the
levels as successive top-level IFDs (several `TiffWriter.write` calls); levels written as SubIFDs are not
seen (OpenSlide 4.0.1, found by trying). It sets openslide.mpp-x/y from resolution tags in centimetres or
inches. Deflate keeps the comparisons exact. A tile whose byte count is zero is missing: OpenSlide leaves
it transparent, which tests the background compositing end to end.
"""
from __future__ import annotations

import contextlib
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
from PIL import Image

from gerne_jax.core.errors import InputError
from gerne_jax.slides import openslide_file
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.openslide_file import OpenSlideFile, composite_background
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tiff_levels import TiffLevel

TILE = 128
SHAPE = (700, 900)


def area_mean_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Levels 0..levels-1, each the rounded 2 x 2 area mean of the previous (sides here are even)."""
    arrays = [image]
    for _ in range(levels - 1):
        h, w = arrays[-1].shape[0] // 2, arrays[-1].shape[1] // 2
        blocks = arrays[-1][: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        arrays.append(np.rint(blocks).astype(np.uint8))
    return arrays


def write_pyramid(path, levels, **level0_tags):
    """A generic tiled TIFF: one top-level IFD per level, the reduced ones marked SubfileType 1."""
    with tifffile.TiffWriter(path) as tiff:
        for index, level in enumerate(levels):
            tiff.write(level, tile=(TILE, TILE), compression="deflate", photometric="rgb",
                       subfiletype=0 if index == 0 else 1, **(level0_tags if index == 0 else {}))
    return path


@pytest.fixture
def pyramid(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (*SHAPE, 3), dtype=np.uint8)
    levels = area_mean_pyramid(image, 3)
    return write_pyramid(tmp_path / "slide.tif", levels), levels


def open_file(path):
    stack = contextlib.ExitStack()
    return stack, OpenSlideFile("slide_1", path, stack)


def windows(shape, seed=0):
    """(rows, cols) slices: random windows, windows at every edge and across tiles, stepped slices."""
    height, width = shape
    rng = np.random.default_rng(seed)
    fixed = [(slice(0, height), slice(0, width)), (slice(height - 1, height), slice(width - 1, width)),
             (slice(TILE - 3, TILE + 5), slice(TILE - 7, 2 * TILE + 1)), (slice(height - 9, height), slice(0, 11)),
             (slice(0, 4), slice(width - 13, width)), (slice(0, height, 3), slice(1, width, 7)),
             (slice(5, height - 1, 2), slice(width - 40, width, 5)), (slice(3, 3), slice(0, 9))]
    random = []
    for _ in range(10):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        step = int(rng.integers(1, 4))
        random.append((slice(y, int(rng.integers(y + 1, height + 1)), step),
                       slice(x, int(rng.integers(x + 1, width + 1)))))
    return fixed + random


def test_levels_read_exactly_as_written_and_as_tifffile_reads_them(pyramid):
    path, levels = pyramid
    stack, slide = open_file(path)
    with stack, tifffile.TiffFile(path) as tiff:
        assert slide.level_shapes == [level.shape[:2] for level in levels]
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.channel_names == ()
        for index, expected in enumerate(levels):
            level, tiff_level = slide.level(index), TiffLevel(tiff, index, "slide_1", path)
            assert (level.shape, level.dtype, level.num_channels) == (expected.shape[:2], np.uint8, 3)
            assert level.chunk_shape == (TILE, TILE)
            for rows, cols in windows(expected.shape[:2], seed=index):
                window = level.read(rows, cols)
                assert window.dtype == np.uint8
                np.testing.assert_array_equal(window, expected[rows, cols])
                np.testing.assert_array_equal(window, tiff_level.read(rows, cols))


def test_reads_larger_than_a_piece_go_in_pieces(pyramid, monkeypatch):
    path, levels = pyramid
    monkeypatch.setattr(openslide_file, "READ_PIECE", 50)
    calls = []
    stack, slide = open_file(path)
    real_read_region = slide._slide.read_region
    monkeypatch.setattr(slide._slide, "read_region", lambda *args: calls.append(args) or real_read_region(*args))
    with stack:
        level = slide.level(1)
        for rows, cols in windows(levels[1].shape[:2], seed=5) + [(slice(0, 350, 60), slice(2, 450, 120))]:
            calls.clear()
            np.testing.assert_array_equal(level.read(rows, cols), levels[1][rows, cols])
            assert all(w <= 50 and h <= 50 for _, _, (w, h) in calls)


def test_threads_read_one_handle_at_once(pyramid):
    path, levels = pyramid
    stack, slide = open_file(path)
    cases = [(index, rows, cols) for index in range(3) for rows, cols in windows(levels[index].shape[:2], seed=9)]
    with stack, ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: slide.level(case[0]).read(case[1], case[2]), cases * 3))
    for (index, rows, cols), window in zip(cases * 3, results):
        np.testing.assert_array_equal(window, levels[index][rows, cols])


def test_composite_background_is_the_over_operator():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[:5, :, 3], rgba[5:10, :, 3] = 0, 255
    rgba[:5, :, :3] = 0  # what un-premultiplying a transparent pixel gives
    background = (10, 200, 77)
    alpha = rgba[..., 3:].astype(float) / 255
    expected = np.rint(rgba[..., :3] * alpha + np.array(background) * (1 - alpha)).astype(np.uint8)
    result = composite_background(rgba, background)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result[:5], np.broadcast_to(background, (5, 50, 3)))
    np.testing.assert_array_equal(result[5:10], rgba[5:10, :, :3])
    # A second library: Pillow's alpha compositing rounds its own way, to within one level.
    pillow = Image.alpha_composite(Image.new("RGBA", (50, 40), (*background, 255)), Image.fromarray(rgba))
    np.testing.assert_allclose(result, np.asarray(pillow)[..., :3], atol=1)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(composite_background(opaque, background), rgba[..., :3])


def test_missing_tile_reads_as_the_white_background(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    path = write_pyramid(tmp_path / "holes.tif", [image])
    with tifffile.TiffFile(path, mode="r+b") as tiff:  # tile 4 (row 1, column 1 of 3 x 3) has no data
        tags = tiff.pages[0].tags
        for name in ("TileByteCounts", "TileOffsets"):
            values = list(tags[name].value)
            values[4] = 0
            tags[name].overwrite(values)
    expected = image.copy()
    expected[TILE:2 * TILE, TILE:2 * TILE] = 255
    stack, slide = open_file(path)
    with stack:
        np.testing.assert_array_equal(slide.level(0).read(slice(0, 300), slice(0, 300)), expected)
        np.testing.assert_array_equal(slide.level(0).read(slice(100, 200, 3), slice(120, 290, 2)),
                                      expected[100:200:3, 120:290:2])


@pytest.mark.parametrize("tags, expected", [
    (dict(resolution=(40000, 40000), resolutionunit="CENTIMETER"), 0.25),   # 1e4 µm / 40000 px
    (dict(resolution=(50800, 50800), resolutionunit="INCH"), 0.5),          # 25400 µm / 50800 px
    (dict(resolution=(40000, 20000), resolutionunit="CENTIMETER"), "anisotropic pixels x=0.25, y=0.5"),
    (dict(resolution=(1, 1), resolutionunit="NONE"), "OpenSlide states no openslide.mpp-x"),
])
def test_pixel_size_from_openslide_mpp(tmp_path, tags, expected):
    image = np.zeros((200, 300, 3), np.uint8)
    stack, slide = open_file(write_pyramid(tmp_path / "mpp.tif", [image], **tags))
    with stack:
        size = slide.pixel_size()
    if isinstance(expected, str):
        assert isinstance(size, str) and expected in size
    else:
        assert (size.x, size.y) == pytest.approx((expected, expected))
        assert "openslide.mpp" in size.source


def test_odd_level_sides_give_openslide_a_fractional_downsample(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, (701, 901, 3), dtype=np.uint8)
    levels = area_mean_pyramid(image, 2)  # 350 x 450: floor of 701 / 2, 901 / 2
    stack, slide = open_file(write_pyramid(tmp_path / "odd.tif", levels))
    with stack:
        assert slide.level_shapes == [(701, 901), (350, 450)]
        assert slide.level_downsamples[1] == pytest.approx((701 / 350 + 901 / 450) / 2)
        # A window at the origin maps to level-0 (0, 0): exact even at a fractional downsample.
        np.testing.assert_array_equal(slide.level(1).read(slice(0, 50), slice(0, 60)), levels[1][:50, :60])


def test_files_openslide_cannot_read_raise_slide_error(tmp_path):
    text = tmp_path / "notes.mrxs"
    text.write_text("not a slide\n")
    png = tmp_path / "picture.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(png)
    for path in (text, png, tmp_path / "absent.svs"):
        with pytest.raises(SlideError, match="OpenSlide cannot read it") as caught:
            open_file(path)
        assert (caught.value.slide_id, caught.value.file) == ("slide_1", str(path))


def test_without_openslide_the_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # makes `import openslide` raise ImportError
    with pytest.raises(InputError, match=r"needs OpenSlide: pip install 'gerne-jax\[openslide\]'") as caught:
        open_file(tmp_path / "slide.mrxs")
    assert str(tmp_path / "slide.mrxs") in str(caught.value)


@pytest.mark.parametrize("shape, downsample", [
    (SHAPE, 2), (SHAPE, 4),        # pyramid levels 1 and 2
    (SHAPE, 3),                    # no level: the area mean of level 0
    ((701, 901), 2),               # OpenSlide's level 1 at downsample 2.0025: read from level 0 instead
])
def test_both_backends_tile_the_same_patches_and_labels(tmp_path, shape, downsample):
    image = np.random.default_rng(6).integers(0, 256, (*shape, 3), dtype=np.uint8)
    levels = area_mean_pyramid(image, 3)
    path = write_pyramid(tmp_path / "slide.tif", levels)
    tumour = np.random.default_rng(8).random((shape[0] // 20 + 1, shape[1] // 20 + 1)) < 0.3
    tumour = tumour.repeat(20, 0).repeat(20, 1)[: shape[0], : shape[1]].astype(np.uint8)
    tifffile.imwrite(tmp_path / "mask.tif", tumour, photometric="minisblack")
    spec = SlideSpec(slide_id="slide_1", image_files=(path,), mask_file=tmp_path / "mask.tif")
    results = {}
    for backend in ("tifffile", "openslide"):
        with SlideReader(spec, downsample=downsample, backend=backend) as slide:
            height, width = slide.shape
            grid = [(y, x, min(64, height - y), min(64, width - x))
                    for y in range(0, height, 48) for x in range(0, width, 56)]
            results[backend] = [(slide.read_region(*window), slide.read_tumour(*window)) for window in grid]
    assert len(results["openslide"]) > 1
    for (y, x, h, w), (image_a, tumour_a), (image_b, tumour_b) in zip(grid, results["tifffile"],
                                                                      results["openslide"]):
        np.testing.assert_array_equal(image_b, image_a)
        np.testing.assert_array_equal(tumour_b, tumour_a)
        # Independently: the level written (area means of 2 x 2 blocks), and the mask at level-0 pixel (i d, j d).
        if downsample in (2, 4):
            np.testing.assert_array_equal(image_b, levels[downsample // 2][y:y + h, x:x + w])
        np.testing.assert_array_equal(tumour_b, tumour[y * downsample:(y + h) * downsample:downsample,
                                                       x * downsample:(x + w) * downsample:downsample] != 0)
