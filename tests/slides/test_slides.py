"""SlideReader and read_manifest against real TIFF / PNG files written in tmp_path.

Every pixel read is compared with the numpy array that was written (brute force), for every layout,
dtype and compression; masks against numpy re-indexing; bad inputs by error class and message.
"""
from __future__ import annotations

import math
import pickle
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from gerne_jax.slides import masks, tiff_levels, views
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest
from gerne_jax.slides.reader import SlideReader
from tests.tiff_layouts import (
    COMPRESSIONS,
    DTYPES,
    HEIGHT,
    LAYOUTS,
    PLANE_PER_CHANNEL_LAYOUTS,
    PYRAMID_LAYOUTS,
    TILE,
    WIDTH,
    open_layout,
    pyramid_levels,
    random_image,
    spec_for,
    write_layout,
    write_mask,
)


def smooth_image(shape=(HEIGHT, WIDTH, 3)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    channels = [120 + 50 * np.sin(yy / 9 + c) + 50 * np.cos(xx / 11 - c) for c in range(shape[2])]
    return np.stack(channels, -1).round().astype(np.uint8)


def windows(shape, count=12, seed=1):
    """Random windows plus ones crossing tile borders and touching every edge."""
    height, width = shape
    rng = np.random.default_rng(seed)
    fixed = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1),
             (10, 10, 12, 12), (0, width - 5, 5, 5), (height - 7, 0, 7, width)]
    fixed = [(y, x, min(h, height - y), min(w, width - x)) for y, x, h, w in fixed]
    random = []
    for _ in range(count):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        random.append((y, x, int(rng.integers(1, height - y + 1)), int(rng.integers(1, width - x + 1))))
    return fixed + random


def assert_regions_equal(reader, image):
    assert reader.shape == image.shape[:2]
    assert reader.num_channels == image.shape[2]
    assert reader.dtype == image.dtype
    for y, x, h, w in windows(image.shape[:2]):
        region = reader.read_region(y, x, h, w)
        assert region.dtype == image.dtype
        np.testing.assert_array_equal(region, image[y:y + h, x:x + w], err_msg=f"window {y, x, h, w}")


# ---------------------------------------------------------------------------------------------------
# Layouts, dtypes, compressions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("storage", [dict(), dict(tile=TILE, compression="zlib")],
                         ids=["stripped-raw", "tiled-zlib"])
def test_every_layout_reads_exact_regions(tmp_path, layout, dtype, storage):
    image = random_image(dtype)
    with SlideReader(open_layout(tmp_path, image, layout, **storage)) as reader:
        assert reader.level_downsample == 1
        assert_regions_equal(reader, image)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("layout,tile", [("interleaved", TILE), ("planar", None), ("ome", TILE)])
def test_every_compression_reads_exact_regions(tmp_path, layout, tile, compression, dtype):
    image = random_image(dtype, seed=3)
    with SlideReader(open_layout(tmp_path, image, layout, compression=compression, tile=tile,
                                 rowsperstrip=7)) as reader:
        assert_regions_equal(reader, image)


@pytest.mark.parametrize("layout", ["interleaved", *PLANE_PER_CHANNEL_LAYOUTS])
@pytest.mark.parametrize("tile", [None, TILE])
def test_jpeg_uint8_within_tolerance(tmp_path, layout, tile):
    """Lossy: windows equal tifffile's whole-page decode exactly, and the original within tolerance."""
    # Interleaved JPEG needs 3 components (RGB); plane-per-channel layouts compress each plane.
    num_channels = 3 if layout == "interleaved" else 4
    image = smooth_image((HEIGHT, WIDTH, num_channels))
    spec = open_layout(tmp_path, image, layout, compression="jpeg", tile=tile)
    decoded = np.stack([tifffile.imread(file) for file in spec.image_files], -1)
    decoded = decoded.reshape(image.shape) if layout in ("interleaved", "per_channel") else (
        np.moveaxis(decoded[..., 0], 0, -1))
    with SlideReader(spec) as reader:
        for y, x, h, w in windows(image.shape[:2]):
            region = reader.read_region(y, x, h, w)
            np.testing.assert_array_equal(region, decoded[y:y + h, x:x + w])
            error = np.abs(region.astype(float) - image[y:y + h, x:x + w])
            assert error.mean() < 8 and error.max() < 48


@pytest.mark.parametrize("layout", ["interleaved", "planar", "ome_pyramid", "per_channel"])
def test_bigtiff(tmp_path, layout):
    image = random_image(np.uint16, seed=4)
    spec = open_layout(tmp_path, image, layout, bigtiff=True, tile=TILE, compression="zstd")
    with tifffile.TiffFile(spec.image_files[0]) as tiff:
        assert tiff.is_bigtiff
    with SlideReader(spec) as reader:
        assert_regions_equal(reader, image)


def test_singleton_axes_are_ignored(tmp_path):
    """A TZCYX OME hyperstack with T = Z = 1 reads as (Y, X, C)."""
    image = random_image(np.uint16, seed=5)
    file = tmp_path / "tzcyx.ome.tif"
    tifffile.imwrite(file, np.moveaxis(image, -1, 0)[None, None], ome=True, tile=TILE,
                     metadata={"axes": "TZCYX"})
    with SlideReader(spec_for([file], write_mask(tmp_path / "m.tif", np.zeros((HEIGHT, WIDTH), np.uint8)))
                     ) as reader:
        assert_regions_equal(reader, image)


def test_one_file_per_channel_and_channel_names(tmp_path):
    image = random_image(np.float32, seed=6)
    names = ("dapi", "cd8", "shg", "tpef")
    files = write_layout(tmp_path / "channels", image, "per_channel", tile=TILE, channel_names=names)
    mask_file = write_mask(tmp_path / "mask.tif", np.zeros((HEIGHT, WIDTH), np.uint8))
    with SlideReader(spec_for(files, mask_file)) as reader:
        # Not from the file names (they often hold the slide id): the same for every slide.
        assert reader.channel_names == ("channel_0", "channel_1", "channel_2", "channel_3")
        assert_regions_equal(reader, image)
    # Channel order follows the files' order.
    with SlideReader(spec_for(files[::-1], mask_file, channel_names=tuple("abcd"))) as reader:
        assert reader.channel_names == tuple("abcd")
        np.testing.assert_array_equal(reader.read_region(0, 0, HEIGHT, WIDTH), image[..., ::-1])


def test_ome_channel_names_read_from_metadata(tmp_path):
    image = random_image(np.uint8, seed=7)
    spec = open_layout(tmp_path, image, "ome", channel_names=("a1", "b2", "c3", "d4"))
    with SlideReader(spec) as reader:
        assert reader.channel_names == ("a1", "b2", "c3", "d4")


# ---------------------------------------------------------------------------------------------------
# Pyramids, downsampling, thumbnails
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", PYRAMID_LAYOUTS)
def test_pyramid_levels_and_downsample(tmp_path, layout):
    image = random_image(np.uint16, seed=8)
    levels = pyramid_levels(image, 3)
    spec = open_layout(tmp_path, image, layout, tile=TILE, compression="zlib", levels=3)
    for level in range(3):
        with SlideReader(spec, level=level) as reader:
            assert reader.level_downsample == 2 ** level
            assert_regions_equal(reader, levels[level])
    with SlideReader(spec, downsample=4) as reader:  # a pyramid level exists: read it
        assert reader.level_downsample == 4
        assert_regions_equal(reader, levels[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("downsample", [2, 3])
def test_downsample_without_pyramid_is_area_mean(tmp_path, dtype, downsample):
    image = random_image(dtype, seed=9)
    height, width = HEIGHT // downsample, WIDTH // downsample
    expected = np.empty((height, width, 4))
    for i in range(height):
        for j in range(width):
            block = image[i * downsample:(i + 1) * downsample, j * downsample:(j + 1) * downsample]
            expected[i, j] = block.astype(np.float64).mean(axis=(0, 1))
    expected = expected.astype(dtype) if dtype == np.float32 else np.rint(expected).astype(dtype)
    with SlideReader(open_layout(tmp_path, image, "interleaved", tile=TILE), downsample=downsample
                     ) as reader:
        assert reader.level_downsample == downsample
        assert_regions_equal(reader, expected)


def test_integer_downsample_matches_brute_force():
    def valid(full, small, d):
        return small in (full // d, -(-full // d))

    for base in [(10, 10), (45, 67), (1, 7), (100, 3)]:
        for reduced in [(h, w) for h in range(1, base[0] + 1) for w in range(1, base[1] + 1)]:
            candidates = [d for d in range(1, max(base) + 2)
                          if all(valid(f, s, d) for f, s in zip(base, reduced))]
            assert tiff_levels.integer_downsample(base, reduced) == (min(candidates) if candidates else None)


def brute_force_thumbnail(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = -(-image.shape[0] // factor), -(-image.shape[1] // factor)
    thumb = np.empty((height, width, image.shape[2]))
    for i in range(height):
        for j in range(width):
            block = image[i * factor:(i + 1) * factor, j * factor:(j + 1) * factor]
            thumb[i, j] = block.astype(np.float64).mean(axis=(0, 1))
    return thumb


@pytest.mark.parametrize("scan_bytes", [8 * 4 * WIDTH * 3, views.SCAN_BYTES], ids=["tiny", "default"])
@pytest.mark.parametrize("factor", [1, 4, 7])
def test_thumbnail_is_block_mean(tmp_path, monkeypatch, factor, scan_bytes):
    image = random_image(np.uint16, seed=10)
    # A tiny scan budget gives many small windows, so window seams are exercised.
    monkeypatch.setattr(views, "SCAN_BYTES", scan_bytes)
    with SlideReader(open_layout(tmp_path, image, "planar", tile=TILE)) as reader:
        thumb = reader.thumbnail(factor)
    assert thumb.dtype == np.float32
    np.testing.assert_allclose(thumb, brute_force_thumbnail(image, factor), rtol=1e-6)


@pytest.mark.parametrize("shape,chunk,multiple_of,budget_px", [
    ((45, 67), (16, 16), 1, 10_000),     # everything fits: one window
    ((45, 67), (16, 16), 1, 16 * 67),    # one chunk row per window
    ((45, 67), (16, 16), 3, 16 * 67),    # chunk rows and multiples of 3: lcm 48 > budget rows
    ((100, 90), (7, 90), 4, 28 * 90),    # strips of 7 rows, blocks of 4: 28-row windows
    ((45, 67), (45, 67), 5, 200),        # one chunk larger than the budget: alignment dropped
    ((50, 1000), (1, 1), 7, 100),        # windows narrower than the width
])
def test_scan_windows_tile_the_level_once(monkeypatch, shape, chunk, multiple_of, budget_px):
    monkeypatch.setattr(views, "SCAN_BYTES", budget_px * 8)
    windows_ = list(views.scan_windows(shape, chunk, 8, multiple_of))
    covered = np.zeros(shape, int)
    for y, x, h, w in windows_:
        covered[y:y + h, x:x + w] += 1
        # Only the last row / column of windows may be cut short; the rest are multiples.
        assert (y + h == shape[0] or h % multiple_of == 0) and (x + w == shape[1] or w % multiple_of == 0)
        # Within budget unless a single unit (multiple_of x multiple_of) exceeds it.
        assert h * w <= max(budget_px, multiple_of ** 2)
        # Chunk-aligned rows whenever one aligned unit (lcm with multiple_of) fits the budget.
        unit_h, unit_w = math.lcm(multiple_of, chunk[0]), math.lcm(multiple_of, chunk[1])
        if unit_h * min(unit_w, shape[1]) <= budget_px:
            assert y % chunk[0] == 0 and (y + h == shape[0] or h % chunk[0] == 0)
    np.testing.assert_array_equal(covered, 1)


def test_thumbnail_prefers_pyramid_level(tmp_path):
    """The pyramid level 1 is a strided (not averaged) copy, so reading it is observable."""
    image = random_image(np.uint8, seed=11)
    level_1 = pyramid_levels(image, 2)[1]
    spec = open_layout(tmp_path, image, "ome_pyramid", tile=TILE, levels=2)
    with SlideReader(spec) as reader:
        np.testing.assert_allclose(reader.thumbnail(2), level_1)  # level 1 read, not averaged
        np.testing.assert_allclose(reader.thumbnail(6), brute_force_thumbnail(level_1, 3), rtol=1e-6)


def test_thumbnail_of_downsampled_level(tmp_path):
    image = random_image(np.float32, seed=12)
    with SlideReader(open_layout(tmp_path, image, "interleaved"), downsample=2) as reader:
        level = reader.read_region(0, 0, *reader.shape)
        np.testing.assert_allclose(reader.thumbnail(5), brute_force_thumbnail(level, 5), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
def random_mask(shape=(HEIGHT, WIDTH), values=(0, 1), seed=13) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.asarray(values, np.uint8), size=shape)


@pytest.mark.parametrize("values", [(0, 1), (0, 255)])
def test_binary_masks(tmp_path, values):
    mask = random_mask(values=values)
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved", mask=mask)
    with SlideReader(spec) as reader:
        reader.validate()
        for y, x, h, w in windows(mask.shape):
            np.testing.assert_array_equal(reader.read_tumour(y, x, h, w), mask[y:y + h, x:x + w] != 0)
        assert reader.read_tissue_mask(0, 0, 3, 3) is None


def test_label_map_needs_tumour_ids(tmp_path):
    mask = random_mask(values=(0, 1, 2, 5))
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved", mask=mask)
    with SlideReader(spec, tumour_ids=[2, 5]) as reader:
        reader.validate()
        for y, x, h, w in windows(mask.shape):
            expected = np.isin(mask[y:y + h, x:x + w], [2, 5])
            np.testing.assert_array_equal(reader.read_tumour(y, x, h, w), expected)
    with SlideReader(spec) as reader:
        with pytest.raises(SlideError) as error:
            reader.validate()
        assert_names(error.value, "mask.tif", "label map")
        assert "0, 1, 2, 5" in str(error.value)
        with pytest.raises(SlideError, match="tumour_ids"):
            reader.read_tumour(0, 0, HEIGHT, WIDTH)


@pytest.mark.parametrize("mode", ["L", "P", "1"])
def test_png_mask(tmp_path, mode):
    mask = random_mask(values=(0, 1))
    png = tmp_path / "mask.png"
    pil = Image.fromarray(mask * 255).convert(mode) if mode == "1" else Image.fromarray(mask, mode="L")
    (pil.convert("P") if mode == "P" else pil).save(png)
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    with SlideReader(spec_for(files, png)) as reader:
        reader.validate()
        np.testing.assert_array_equal(reader.read_tumour(0, 0, HEIGHT, WIDTH), mask != 0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_grey_png_mask_saved_in_colour_is_read_as_its_grey(tmp_path, mode):
    mask = random_mask(values=(0, 255))
    opaque = np.full_like(mask, 255)
    channels = {"RGB": [mask] * 3, "RGBA": [mask] * 3 + [opaque], "LA": [mask, opaque]}[mode]
    png = tmp_path / "mask.png"
    Image.fromarray(np.dstack(channels), mode=mode).save(png)
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    with SlideReader(spec_for(files, png)) as reader:
        reader.validate()
        np.testing.assert_array_equal(reader.read_tumour(0, 0, HEIGHT, WIDTH), mask != 0)


@pytest.mark.parametrize("mode, message", [("RGB", "1 pixels have differing colour channels"),
                                           ("RGBA", "2 pixels that are not fully opaque")])
def test_colour_png_mask_that_is_not_grey_is_refused(tmp_path, mode, message):
    mask = random_mask(values=(0, 255))
    array = np.dstack([mask] * 3 + ([np.full_like(mask, 255)] if mode == "RGBA" else []))
    if mode == "RGB":
        array[0, 0] = (255, 7, 255)      # one reddish-purple pixel
    else:
        array[:2, 0, 3] = 0              # two transparent pixels
    png = tmp_path / "mask.png"
    Image.fromarray(array, mode=mode).save(png)
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    with pytest.raises(SlideError) as error:
        SlideReader(spec_for(files, png)).__enter__()
    assert_names(error.value, "mask.png", message)


@pytest.mark.parametrize("downsample,layout", [(2, "ome_pyramid"), (3, "interleaved")])
def test_level0_mask_read_at_reduced_level_is_nearest(tmp_path, downsample, layout):
    mask = random_mask(values=(0, 255))
    spec = open_layout(tmp_path, random_image(np.uint8), layout, mask=mask, tile=TILE)
    with SlideReader(spec, downsample=downsample) as reader:
        height, width = reader.shape
        expected = np.array([[mask[i * downsample, j * downsample] != 0 for j in range(width)]
                             for i in range(height)])
        for y, x, h, w in windows(reader.shape):
            np.testing.assert_array_equal(reader.read_tumour(y, x, h, w), expected[y:y + h, x:x + w])


def test_mask_at_chosen_level_resolution(tmp_path):
    image = random_image(np.uint8)
    level_mask = random_mask(shape=pyramid_levels(image, 2)[1].shape[:2], seed=14)
    files = write_layout(tmp_path / "img", image, "subifd_pyramid", levels=2)
    with SlideReader(spec_for(files, write_mask(tmp_path / "m.tif", level_mask)), level=1) as reader:
        np.testing.assert_array_equal(reader.read_tumour(0, 0, *reader.shape), level_mask != 0)


@pytest.mark.parametrize("which", ["tissue", "tumour"])
@pytest.mark.parametrize("factor,rounding", [(1, "ceil"), (4, "ceil"), (4, "floor"), (5, "ceil")])
def test_mask_at_a_fraction_of_the_level_is_upsampled_nearest(tmp_path, factor, rounding, which):
    shape = ((-(-HEIGHT // factor), -(-WIDTH // factor)) if rounding == "ceil"
             else (HEIGHT // factor, WIDTH // factor))
    small = random_mask(shape=shape, values=(0, 255), seed=15)
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    empty = np.zeros((HEIGHT, WIDTH), np.uint8)
    if which == "tissue":
        spec = spec_for(files, write_mask(tmp_path / "m.tif", empty),
                        tissue_mask_file=write_mask(tmp_path / "small.tif", small))
    else:
        spec = spec_for(files, write_mask(tmp_path / "small.tif", small))
    expected = np.array([[small[min(i // factor, shape[0] - 1), min(j // factor, shape[1] - 1)] != 0
                          for j in range(WIDTH)] for i in range(HEIGHT)])
    with SlideReader(spec) as reader:
        reader.validate()
        read = reader.read_tissue_mask if which == "tissue" else reader.read_tumour
        for y, x, h, w in windows((HEIGHT, WIDTH)):
            np.testing.assert_array_equal(read(y, x, h, w), expected[y:y + h, x:x + w])


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def assert_names(error: SlideError, file_name: str, problem: str):
    message = str(error)
    assert "slide_7" in message and error.slide_id == "slide_7"
    assert file_name in message and file_name in error.file
    assert problem in message


def test_mask_shape_mismatch_names_both_shapes(tmp_path):
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved",
                       mask=np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "mask.tif", f"({HEIGHT + 1}, {WIDTH})")
    assert f"({HEIGHT}, {WIDTH})" in str(error.value)


def test_unsupported_dtype(tmp_path):
    spec = open_layout(tmp_path, random_image(np.uint8).astype(np.int16), "interleaved")
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "img.tif", "int16")


@pytest.mark.parametrize("other", ["shape", "dtype"])
def test_channel_files_of_unequal_shape_or_dtype(tmp_path, other):
    image = random_image(np.uint8)
    files = write_layout(tmp_path / "ch", image, "per_channel")
    odd = image[:-1, :, 0] if other == "shape" else image[..., 0].astype(np.uint16)
    tifffile.imwrite(files[2], odd)
    spec = spec_for(files, write_mask(tmp_path / "m.tif", np.zeros((HEIGHT, WIDTH), np.uint8)))
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, files[2].name, "channel files differ")


def test_constant_image_is_empty_slide(tmp_path):
    spec = open_layout(tmp_path, np.full((HEIGHT, WIDTH, 2), 9, np.uint16), "interleaved")
    with SlideReader(spec) as reader, pytest.raises(SlideError) as error:
        reader.validate()
    assert_names(error.value, "img.tif", "empty slide")


def test_zero_size_image_is_empty_slide(tmp_path):
    file = tmp_path / "img.tif"
    with pytest.warns(UserWarning):  # tifffile warns that zero-size TIFFs are nonconformant
        tifffile.imwrite(file, np.zeros((0, WIDTH, 3), np.uint8))
    spec = spec_for([file], write_mask(tmp_path / "m.tif", np.zeros((HEIGHT, WIDTH), np.uint8)))
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "img.tif", "empty slide: zero size")


@pytest.mark.parametrize("keep_fraction,problem", [(0.5, "truncated TIFF"), (0.003, "cannot read")])
def test_truncated_tiff(tmp_path, keep_fraction, problem):
    """Cut in the pixel data (tifffile writes the IFD first): header check; cut in the IFD: open fails."""
    spec = open_layout(tmp_path, random_image(np.uint16), "interleaved", tile=TILE)
    data = spec.image_files[0].read_bytes()
    spec.image_files[0].write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(SlideError) as error:
        with SlideReader(spec) as reader:
            reader.read_region(0, 0, HEIGHT, WIDTH)
    assert_names(error.value, "img.tif", problem)


def test_corrupt_compressed_tile(tmp_path):
    spec = open_layout(tmp_path, random_image(np.uint16), "interleaved", tile=TILE, compression="zlib")
    file = spec.image_files[0]
    with tifffile.TiffFile(file) as tiff:
        offset, count = tiff.pages[0].dataoffsets[0], tiff.pages[0].databytecounts[0]
    data = bytearray(file.read_bytes())
    data[offset:offset + count] = b"\xff" * count
    file.write_bytes(bytes(data))
    with SlideReader(spec) as reader, pytest.raises(SlideError) as error:
        reader.read_region(0, 0, 4, 4)
    assert_names(error.value, "img.tif", "cannot read")


@pytest.mark.parametrize("which", ["image", "mask"])
@pytest.mark.parametrize("tag", ["ImageWidth", "ImageLength", "RowsPerStrip"])
def test_zero_size_tag_is_a_slide_error(tmp_path, which, tag):
    """A corrupt header with a zero dimension makes tifffile divide by zero: a SlideError, not a crash."""
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved")
    file = spec.image_files[0] if which == "image" else spec.mask_file
    with tifffile.TiffFile(file) as tiff:
        field = tiff.pages[0].tags[tag]
        offset, size = field.valueoffset, {tifffile.DATATYPE.SHORT: 2, tifffile.DATATYPE.LONG: 4}[field.dtype]
    data = bytearray(file.read_bytes())
    data[offset:offset + size] = bytes(size)
    file.write_bytes(bytes(data))
    with pytest.raises(SlideError) as error:
        with SlideReader(spec) as reader:
            reader.validate()
    assert_names(error.value, file.name, "")  # whichever check meets it first names the file


def test_several_series_of_one_shape_rejected(tmp_path):
    """tifffile writing channels page by page with its own metadata makes one series per channel."""
    image = random_image(np.uint8)
    file = tmp_path / "img.tif"
    with tifffile.TiffWriter(file) as writer:
        for c in range(image.shape[2]):
            writer.write(image[..., c])
    spec = spec_for([file], write_mask(tmp_path / "m.tif", np.zeros((HEIGHT, WIDTH), np.uint8)))
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "img.tif", "4 image series")


def test_not_a_tiff(tmp_path):
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved")
    spec.image_files[0].write_bytes(b"this is not an image")
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "img.tif", "cannot read")


def test_float_mask_rejected(tmp_path):
    """(A colour PNG mask: `test_colour_png_mask_that_is_not_grey_is_refused`.)"""
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    float_mask = write_mask(tmp_path / "float.tif", np.zeros((HEIGHT, WIDTH), np.float32))
    with pytest.raises(SlideError) as error:
        SlideReader(spec_for(files, float_mask)).__enter__()
    assert_names(error.value, "float.tif", "float32")


def test_png_mask_too_large_to_read_whole(tmp_path, monkeypatch):
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", HEIGHT * WIDTH // 4)  # Pillow's bomb limit
    with pytest.raises(SlideError) as error:
        SlideReader(spec_for(files, png)).__enter__()
    assert_names(error.value, "big.png", "tiled TIFF")


def test_level_errors_and_window_checks(tmp_path):
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved")
    with pytest.raises(SlideError) as error:
        SlideReader(spec, level=2).__enter__()
    assert_names(error.value, "img.tif", "level 2")
    with pytest.raises(ValueError, match="give one of level, downsample and mpp"):
        SlideReader(spec, level=1, downsample=2)
    reader = SlideReader(spec)
    with pytest.raises(RuntimeError, match="with"):
        reader.read_region(0, 0, 1, 1)
    with reader, pytest.raises(ValueError, match="outside"):
        reader.read_region(HEIGHT - 1, 0, 2, 1)


def test_channel_name_count_mismatch(tmp_path):
    files = write_layout(tmp_path / "img", random_image(np.uint8), "interleaved")
    spec = spec_for(files, write_mask(tmp_path / "m.tif", np.zeros((HEIGHT, WIDTH), np.uint8)),
                    channel_names=("a", "b"))
    with pytest.raises(SlideError) as error:
        SlideReader(spec).__enter__()
    assert_names(error.value, "img.tif", "2 channel names")


def test_slide_error_pickles_with_fields():
    error = pickle.loads(pickle.dumps(SlideError("s1", "a.tif", "broken")))
    assert (error.slide_id, error.file, error.problem) == ("s1", "a.tif", "broken")
    assert str(error) == "slide 's1', file 'a.tif': broken"


# ---------------------------------------------------------------------------------------------------
# Laziness
# ---------------------------------------------------------------------------------------------------
LARGE_SIZE, LARGE_TILE = 4096, 256


def large_tile_value(y, x):
    return ((y // LARGE_TILE) * (LARGE_SIZE // LARGE_TILE) + x // LARGE_TILE) % 251


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory) -> SlideSpec:
    """A 4096 x 4096 x 3 uint8 tiled file (48 MiB of pixels) whose every tile is constant."""
    folder = tmp_path_factory.mktemp("large")

    def tiles():
        for index in range((LARGE_SIZE // LARGE_TILE) ** 2):
            yield np.full((LARGE_TILE, LARGE_TILE, 3), index % 251, np.uint8)

    file = folder / "large.tif"
    tifffile.imwrite(file, tiles(), shape=(LARGE_SIZE, LARGE_SIZE, 3), dtype=np.uint8,
                     tile=(LARGE_TILE, LARGE_TILE), compression="zlib", photometric="rgb")
    mask = folder / "mask.tif"
    tifffile.imwrite(mask, np.zeros((LARGE_SIZE, LARGE_SIZE), np.uint8), tile=(LARGE_TILE, LARGE_TILE),
                     compression="zlib")
    return spec_for([file], mask)


def test_small_region_of_large_tiled_file_reads_only_its_tiles(large_slide):
    """Reading a 64 x 64 window allocates a few tiles' worth, nowhere near the 48 MiB image."""
    top, left = LARGE_TILE - 32, 2 * LARGE_TILE - 32  # crosses four tiles
    with SlideReader(large_slide) as reader:
        tracemalloc.start()
        region = reader.read_region(top, left, 64, 64)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * LARGE_TILE * LARGE_TILE * 3 * 2
    expected = np.array([[large_tile_value(top + i, left + j) for j in range(64)] for i in range(64)])
    np.testing.assert_array_equal(region, np.repeat(expected[..., None], 3, axis=-1))


def test_thumbnail_of_large_file_in_bounded_memory(large_slide, monkeypatch):
    """The whole image as float64 would be 384 MiB; the scan stays within about SCAN_BYTES."""
    monkeypatch.setattr(views, "SCAN_BYTES", 8 << 20)
    with SlideReader(large_slide) as reader:
        tracemalloc.start()
        thumb = reader.thumbnail(128)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 2 * views.SCAN_BYTES
    # Each 128 x 128 block lies in one constant tile.
    expected = np.array([[large_tile_value(i * 128, j * 128) for j in range(32)] for i in range(32)])
    np.testing.assert_array_equal(thumb, np.repeat(expected[..., None], 3, axis=-1).astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# Decoded-chunk cache and mask value checks
# ---------------------------------------------------------------------------------------------------
def count_chunk_decodes(source) -> dict:
    """Wraps the segment decoder of a `TiffLevel` (tifffile's `TiffPage.decode`, or tifffile's zarr
    store when the level reads through zarr); returns {segment: times decoded}."""
    fetched = {}
    if source._windows is not None:
        windows, resolve = source._windows, source._windows._resolve

        def counting_resolve(future, key, *args):  # key: (page, segment index)
            fetched[key] = fetched.get(key, 0) + 1
            return resolve(future, key, *args)

        windows._resolve = counting_resolve
        return fetched
    store = source._array.store._store  # zarr array -> _ChunkCache -> tifffile's ZarrTiffStore
    get = store.get

    async def counting_get(key, *args, **kwargs):
        if key.split("/")[-1][0].isdigit():  # chunk keys ("c/0/1/0" or "0.1.0"), not metadata
            fetched[key] = fetched.get(key, 0) + 1
        return await get(key, *args, **kwargs)

    store.get = counting_get
    return fetched


@pytest.mark.parametrize("layout,storage", [("interleaved", dict(tile=(16, 16), compression="zlib")),
                                            ("planar", dict(tile=(16, 16))),
                                            ("multipage", dict(rowsperstrip=8, compression="zstd"))])
def test_band_scan_decodes_every_chunk_once(tmp_path, layout, storage):
    """Bands of 12 rows cut through rows of 16-pixel tiles (and 8-row strips): each tile is
    decoded once, and the bands, read in column chunks too, equal the array."""
    image = random_image(np.uint16, shape=(70, 53, 3), seed=4)
    with SlideReader(open_layout(tmp_path, image, layout, **storage)) as reader:
        fetched = count_chunk_decodes(reader._image.sources[0])
        for y in range(0, 70, 12):
            for x0, x1 in ((0, 20), (20, 53)):
                h = min(12, 70 - y)
                np.testing.assert_array_equal(reader.read_region(y, x0, h, x1 - x0), image[y:y + h, x0:x1])
    tiles_down = math.ceil(70 / (16 if "tile" in storage else 8))
    tiles_across = math.ceil(53 / 16) if "tile" in storage else 1
    planes = 3 if layout in PLANE_PER_CHANNEL_LAYOUTS else 1
    assert len(fetched) == tiles_down * tiles_across * planes
    assert set(fetched.values()) == {1}


def test_chunk_cache_too_small_still_reads_exact_regions(tmp_path, monkeypatch):
    """Without room for a row of tiles the cache only misses: regions are still exact."""
    monkeypatch.setattr(tiff_levels, "CHUNK_CACHE_BYTES", 16 * 16 * 4 * 2)  # two tiles of 4 uint16 channels
    image = random_image(np.uint16)
    with SlideReader(open_layout(tmp_path, image, "interleaved", tile=TILE)) as reader:
        fetched = count_chunk_decodes(reader._image.sources[0])
        assert_regions_equal(reader, image)
        for y in range(0, HEIGHT, 5):
            np.testing.assert_array_equal(reader.read_region(y, 0, min(5, HEIGHT - y), WIDTH), image[y:y + 5])
    assert max(fetched.values()) > 1


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.int16, np.int32])
def test_distinct_mask_values_match_numpy_unique(dtype):
    rng = np.random.default_rng(8)
    value_sets = [(0,), (1,), (0, 1), (0, 255), (255,), (0, 1, 255), (0, 254, 255), (0, 2), (3, 4),
                  (0, 7, 300), (-1, 0), (-5, 1, 2)]
    for values in value_sets:
        info = np.iinfo(dtype) if dtype is not bool else None
        if info is not None and not all(info.min <= v <= info.max for v in values):
            continue
        if dtype is bool and not set(values) <= {0, 1}:
            continue
        array = rng.choice(np.asarray(values), size=(31, 17)).astype(dtype)
        assert masks.distinct_values(array) == set(np.unique(array).tolist()), (dtype, values)
    assert masks.distinct_values(np.zeros((0, 5), dtype)) == set()


def test_mask_values_checked_per_read_without_validate(tmp_path):
    """read_tumour checks each window when `validate` has not checked the whole mask."""
    mask = random_mask(values=(0, 255))
    mask[40, 60] = 7
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved", mask=mask)
    with SlideReader(spec) as reader:
        np.testing.assert_array_equal(reader.read_tumour(0, 0, 40, WIDTH), mask[:40] != 0)
        with pytest.raises(SlideError, match=r"values \[0, 7, 255\] .* in window y=35 x=0"):
            reader.read_tumour(35, 0, 10, WIDTH)
        reader.validate(mask_values=False)  # leaves the values to read_tumour, as checked above
        with pytest.raises(SlideError, match="label map"):
            reader.validate()


# ---------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------
def write_manifest(folder, text):
    path = folder / "manifest.csv"
    path.write_text(text)
    return path


@pytest.fixture
def slide_files(tmp_path):
    image = random_image(np.uint8)
    write_layout(tmp_path / "a", image, "interleaved")
    write_layout(tmp_path / "chan", image, "per_channel")
    write_mask(tmp_path / "mask.tif", np.zeros((HEIGHT, WIDTH), np.uint8))
    return tmp_path


def test_read_manifest_resolves_paths_and_fields(slide_files):
    path = write_manifest(slide_files, (
        "slide_id,image,channels,mask,tissue_mask,patient_id,split,channel_names\n"
        "s1,a.tif,,mask.tif,,p1,train,r;g;b;x\n"
        f"s2,,chan/channel_0.tif; chan/channel_1.tif,{slide_files / 'mask.tif'},mask.tif,,test,\n"))
    first, second = read_manifest(path)
    assert first == SlideSpec("s1", (slide_files / "a.tif",), slide_files / "mask.tif", None, "p1",
                              "train", ("r", "g", "b", "x"))
    assert second.image_files == (slide_files / "chan/channel_0.tif", slide_files / "chan/channel_1.tif")
    assert second.tissue_mask_file == slide_files / "mask.tif"
    assert (second.patient_id, second.split, second.channel_names) == (None, "test", None)
    with SlideReader(first) as reader:
        assert reader.channel_names == ("r", "g", "b", "x")


@pytest.mark.parametrize("rows,file_name,problem", [
    ("slide_7,missing.tif,,mask.tif,", "missing.tif", "file not found"),
    ("slide_7,a.tif,,nomask.png,", "nomask.png", "file not found"),
    ("slide_7,a.tif,,mask.tif,\nslide_7,a.tif,,mask.tif,", "manifest.csv", "duplicate slide_id on lines 2 and 3"),
    ("slide_7,a.tif,chan/channel_0.tif,mask.tif,", "manifest.csv", "found both"),
    ("slide_7,,,mask.tif,", "manifest.csv", "found neither"),
    ("slide_7,a.tif,,mask.tif,training", "manifest.csv", "bad split 'training'"),
    ("slide_7,,chan/channel_0.tif;;chan/channel_1.tif,mask.tif,", "manifest.csv", "empty entry"),
])
def test_bad_manifest_rows(slide_files, rows, file_name, problem):
    """Each bad row names the slide, the file at fault (or the manifest) and the problem."""
    path = write_manifest(slide_files, "slide_id,image,channels,mask,split\n" + rows + "\n")
    with pytest.raises(SlideError) as error:
        read_manifest(path)
    assert_names(error.value, file_name, problem)


def test_manifest_channel_names_checked(slide_files):
    header = "slide_id,channels,mask,channel_names\n"
    for names, problem in [("a;b;c", "3 channel names for 2 channel files"), ("a;a", "duplicate channel")]:
        path = write_manifest(slide_files, header + f"slide_7,chan/channel_0.tif;chan/channel_1.tif,"
                              f"mask.tif,{names}\n")
        with pytest.raises(SlideError) as error:
            read_manifest(path)
        assert_names(error.value, "manifest.csv", problem)


def test_manifest_line_numbers_count_blank_lines(slide_files):
    path = write_manifest(slide_files, "slide_id,image,mask\n\nslide_7,a.tif,mask.tif\n\n"
                          "slide_7,a.tif,mask.tif\n")
    with pytest.raises(SlideError, match="lines 3 and 5"):
        read_manifest(path)


@pytest.mark.parametrize("text,problem", [
    ("slide_id,image,mask,colour\ns,a.tif,mask.tif,red\n", "unknown column(s) ['colour']"),
    ("slide_id,image\ns,a.tif\n", "missing column(s) ['mask or annotations']"),
    ("slide_id,mask\ns,mask.tif\n", "image or channels"),
    ("slide_id,image,mask\n", "no slides"),
    ("", "no header"),
    ("slide_id,image,mask,image\ns,a.tif,mask.tif,a.tif\n", "repeated column(s) ['image']"),
    ("slide_id,image,mask\ns,a.tif,mask.tif,extra\n", "line 2: more values than columns"),
    ("slide_id,image,mask\n,a.tif,mask.tif\n", "line 2: empty slide_id"),
])
def test_bad_manifest_header(slide_files, text, problem):
    with pytest.raises(ValueError) as error:
        read_manifest(write_manifest(slide_files, text))
    assert problem in str(error.value) and "manifest.csv" in str(error.value)
