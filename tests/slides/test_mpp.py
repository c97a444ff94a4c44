"""`SlideReader` at microns per pixel (`mpp=`) and with channels chosen by name, against brute force.

The slides are OME pyramids (`write_layout`, levels by 2x2 striding: `pyramid_levels`) whose level 0 is
stated as 0.25 µm (`set_ome_pixel_size`), per-channel files with the pixel size in the manifest, and an
Aperio SVS. A level read at a scale s = p / q is compared with the area means of the level's array on a fine
grid of q x q pixels per pixel (`fine_block_sums`); a mask read by coverage with the fine pixels inside
counted on the same grid; channels with numpy indexing of the written image.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from gerne_jax.slides import views
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tiff_levels import TiffLevel
from tests.tiff_layouts import (
    HEIGHT,
    WIDTH,
    fine_block_sums,
    pyramid_levels,
    random_image,
    set_ome_pixel_size,
    spec_for,
    write_aperio_svs,
    write_layout,
    write_mask,
)

BASE_MPP = 0.25
NAMES = ("A", "B", "C", "D")


def ome_slide(tmp_path, image, mpp=BASE_MPP, **kw) -> list:
    files = write_layout(tmp_path / "img", image, "ome_pyramid", levels=3, channel_names=NAMES, **kw)
    return files if mpp is None else [set_ome_pixel_size(files[0], mpp)]


def area_means(level: np.ndarray, p: int, q: int) -> np.ndarray:
    """Brute force: `level` resampled by s = p / q (float64 means)."""
    return fine_block_sums(level, p, q) / p ** 2


def assert_values_equal(got: np.ndarray, means: np.ndarray, p: int) -> None:
    """`got` (the level's dtype) is `means` rounded as `resample.to_dtype` does: the nearest integer, either
    neighbour at an exact tie k + 1/2 (possible for even p only); float types within float32 rounding."""
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, means, rtol=1e-6)
        return
    sums = np.rint(means * p * p)  # integers: the sums of p * p fine pixels
    ties = (2 * sums) % (2 * p * p) == p * p
    np.testing.assert_array_equal(got[~ties], np.rint(means[~ties]))
    assert np.isin(got[ties] - np.floor(means[ties]), [0, 1]).all()


def covered(mask_inside: np.ndarray, scale: Fraction, shape: tuple[int, int]) -> np.ndarray:
    """Brute force: grid pixels of `scale` mask pixels a side at least half inside (fine pixels counted)."""
    inside = fine_block_sums(mask_inside, scale.numerator, scale.denominator, shape)
    return 2 * inside >= scale.numerator ** 2


# -- levels and scales --------------------------------------------------------------------------------------
# within SCALE_TOLERANCE of a level, finer or coarser, is at it: 0.25 * 0.9990005 is 0.9995e-3 finer than level 0
@pytest.mark.parametrize("mpp, level", [(0.25, 0), (0.2502, 0), (0.25 * 0.9995, 0), (0.25 * 0.9990005, 0),
                                        (0.5, 1), (0.4998, 1), (1.0, 2)])
def test_a_level_at_its_mpp_is_read_as_it_is(tmp_path, mpp, level):
    image = random_image(np.uint16)
    with SlideReader(spec_for(ome_slide(tmp_path, image), None), mpp=mpp) as slide:
        expected = pyramid_levels(image, 3)[level]
        assert slide.shape == expected.shape[:2]
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), expected)
        assert slide.scale == 2 ** level
        assert slide.base_mpp == BASE_MPP
        assert slide.mpp == pytest.approx(BASE_MPP * 2 ** level, rel=1e-12)


# mpp -> (level, s = p / q): 0.7 µm is 2.8 level-0 pixels, level 1 resampled by 1.4; 1.3 µm is 5.2, level 2 by 1.3
@pytest.mark.parametrize("mpp, level, p, q", [(0.7, 1, 7, 5), (1.3, 2, 13, 10), (0.35, 0, 7, 5), (0.375, 0, 3, 2),
                                              (0.6, 1, 6, 5)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_level_resampled_to_the_mpp_is_its_area_means(tmp_path, dtype, mpp, level, p, q):
    image = random_image(dtype, seed=level + p)
    with SlideReader(spec_for(ome_slide(tmp_path, image), None), mpp=mpp) as slide:
        source = pyramid_levels(image, 3)[level]
        expected = area_means(source, p, q)
        assert slide.shape == (source.shape[0] * q // p, source.shape[1] * q // p) == expected.shape[:2]
        got = slide.read_region(0, 0, *slide.shape)
        assert got.dtype == dtype
        assert_values_equal(got, expected, p)
        assert slide.scale == pytest.approx(2 ** level * p / q, rel=1e-12)
        assert slide.mpp == pytest.approx(mpp, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_windows_at_a_resampled_scale_equal_the_crop_of_one_whole_read(tmp_path, dtype):
    image = random_image(dtype, seed=5)
    with SlideReader(spec_for(ome_slide(tmp_path, image, tile=(16, 16)), None), mpp=0.77) as slide:
        whole = slide.read_region(0, 0, *slide.shape)
        rng = np.random.default_rng(0)
        height, width = slide.shape
        for _ in range(30):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            h, w = int(rng.integers(1, height - y + 1)), int(rng.integers(1, width - x + 1))
            assert np.array_equal(slide.read_region(y, x, h, w), whole[y:y + h, x:x + w]), (y, x, h, w)
        with pytest.raises(ValueError, match="outside the level's shape"):
            slide.read_region(0, 0, height + 1, width)


def test_manifest_mpp_overrides_the_files(tmp_path):
    image = random_image(np.uint8)
    spec = spec_for(ome_slide(tmp_path, image), None, mpp=0.5)  # the file says 0.25
    with SlideReader(spec, mpp=1.0) as slide:
        assert slide.base_mpp == 0.5
        assert slide.scale == 2
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), pyramid_levels(image, 3)[1])


def test_unknown_pixel_size_names_the_file_and_the_reason(tmp_path):
    files = ome_slide(tmp_path, random_image(np.uint8), mpp=None)  # tifffile's resolution unit: NONE
    with pytest.raises(SlideError, match="pixel size unknown") as error:
        SlideReader(spec_for(files, None), mpp=0.5).__enter__()
    assert error.value.file == str(files[0])
    assert "not a physical unit" in error.value.problem
    assert "manifest's mpp column" in error.value.problem
    with SlideReader(spec_for(files, None, mpp=0.25), mpp=0.5) as slide:  # the manifest's size instead
        assert slide.scale == 2
    with SlideReader(spec_for(files, None)) as slide:  # without mpp the size is not needed
        assert slide.base_mpp is None and slide.mpp is None and slide.scale == 1


def test_unknown_pixel_size_of_channel_files_names_the_first(tmp_path):
    files = write_layout(tmp_path / "img", random_image(np.uint8), "per_channel")
    with pytest.raises(SlideError, match="pixel size unknown") as error:
        SlideReader(spec_for(files, None), mpp=0.5).__enter__()
    assert f"{files[0].name}: the TIFF resolution unit is NONE" in error.value.problem


@pytest.mark.parametrize("mpp", [0.2, 0.249])
def test_mpp_finer_than_level_0_is_a_slide_error(tmp_path, mpp):
    files = ome_slide(tmp_path, random_image(np.uint8))
    with pytest.raises(SlideError, match=f"mpp {mpp:g} is finer than the slide's level 0 \\(0.25 µm/pixel\\)"):
        SlideReader(spec_for(files, None), mpp=mpp).__enter__()


@pytest.mark.parametrize("mpp", [0, -0.5, math.nan, math.inf])
def test_mpp_not_a_positive_number_is_refused(tmp_path, mpp):
    with pytest.raises(ValueError, match="mpp must be > 0"):
        SlideReader(spec_for(ome_slide(tmp_path, random_image(np.uint8)), None), mpp=mpp)


def test_mpp_with_level_or_downsample_is_refused(tmp_path):
    spec = spec_for(ome_slide(tmp_path, random_image(np.uint8)), None)
    for other in (dict(level=1), dict(downsample=2)):
        with pytest.raises(ValueError, match="give one of level, downsample and mpp"):
            SlideReader(spec, mpp=0.5, **other)


# -- masks by coverage ----------------------------------------------------------------------------------------
# A mask of level 0's shape, half of it (ceil, as pyramid levels round) and a quarter (floor): read at 0.7 µm
# (2.8 level-0 pixels) a grid pixel is 14 / (5 f) mask pixels of a mask f times smaller than level 0.
MASK_SHAPES = {1: (HEIGHT, WIDTH), 2: (-(-HEIGHT // 2), -(-WIDTH // 2)), 4: (HEIGHT // 4, WIDTH // 4)}


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("high", [1, 255])
def test_tumour_mask_by_area_coverage(tmp_path, factor, high):
    inside = np.random.default_rng(factor).random(MASK_SHAPES[factor]) < 0.5
    mask = write_mask(tmp_path / "mask.tif", (inside * high).astype(np.uint8))
    with SlideReader(spec_for(ome_slide(tmp_path, random_image(np.uint8)), mask), mpp=0.7) as slide:
        expected = covered(inside, Fraction(14, 5 * factor), slide.shape)
        np.testing.assert_array_equal(slide.read_tumour(0, 0, *slide.shape), expected)
        np.testing.assert_array_equal(slide.read_tumour(3, 5, 7, 11), expected[3:10, 5:16])
        slide.validate()


@pytest.mark.parametrize("layout", ["ome_pyramid", "interleaved"])
def test_masks_at_mpp_are_by_coverage_whether_a_level_is_resampled_or_not(tmp_path, layout):
    """0.5 µm is level 1 of the pyramid read as it is, or level 0 resampled by 2: the same labels."""
    inside = np.random.default_rng(4).random((HEIGHT, WIDTH)) < 0.5
    quarter = np.random.default_rng(5).random(MASK_SHAPES[4]) < 0.5
    files = write_layout(tmp_path / "img", random_image(np.uint8), layout)
    spec = spec_for(files, write_mask(tmp_path / "mask.tif", inside.astype(np.uint8)), mpp=BASE_MPP,
                    tissue_mask_file=write_mask(tmp_path / "tissue.tif", quarter.astype(np.uint8)))
    with SlideReader(spec, mpp=0.5) as slide:
        assert slide.scale == 2
        # 2 x 2 level-0 pixels, at least half inside (2 of 4 is half); a quarter-size mask pixel per 2 x 2 pixels
        np.testing.assert_array_equal(slide.read_tumour(0, 0, *slide.shape), covered(inside, Fraction(2), slide.shape))
        np.testing.assert_array_equal(slide.read_tissue_mask(0, 0, *slide.shape),
                                      covered(quarter, Fraction(1, 2), slide.shape))


def test_label_map_mask_at_mpp_needs_tumour_ids(tmp_path):
    labels = np.random.default_rng(3).integers(0, 4, (HEIGHT, WIDTH)).astype(np.uint8)
    spec = spec_for(ome_slide(tmp_path, random_image(np.uint8)), write_mask(tmp_path / "labels.tif", labels))
    with SlideReader(spec, mpp=0.7, tumour_ids=[2, 3]) as slide:
        expected = covered(np.isin(labels, [2, 3]), Fraction(14, 5), slide.shape)
        slide.validate()
        np.testing.assert_array_equal(slide.read_tumour(0, 0, *slide.shape), expected)
    with SlideReader(spec, mpp=0.7) as slide:
        with pytest.raises(SlideError, match="mask is a label map"):
            slide.read_tumour(0, 0, *slide.shape)
        with pytest.raises(SlideError, match="mask is a label map"):
            slide.validate()


def test_tissue_mask_by_area_coverage(tmp_path):
    tissue = np.random.default_rng(9).integers(0, 3, MASK_SHAPES[4]).astype(np.uint8) * 7  # nonzero = tissue
    spec = spec_for(ome_slide(tmp_path, random_image(np.uint8)), None,
                    tissue_mask_file=write_mask(tmp_path / "tissue.tif", tissue))
    with SlideReader(spec, mpp=0.7) as slide:
        assert slide.has_tissue_mask
        expected = covered(tissue != 0, Fraction(14, 20), slide.shape)
        np.testing.assert_array_equal(slide.read_tissue_mask(0, 0, *slide.shape), expected)
        np.testing.assert_array_equal(slide.read_tumour(0, 0, *slide.shape), np.zeros(slide.shape, bool))


def test_mask_of_another_shape_is_refused_at_mpp(tmp_path):
    mask = write_mask(tmp_path / "mask.tif", np.zeros((20, 30), np.uint8))
    with pytest.raises(SlideError, match=r"mask shape \(20, 30\) does not match the image"):
        SlideReader(spec_for(ome_slide(tmp_path, random_image(np.uint8)), mask), mpp=0.7).__enter__()


# -- thumbnail and validation -------------------------------------------------------------------------------
# A thumbnail pixel is factor x the grid's pixel: at 0.7 µm (2.8 level-0 pixels) that is 2.8 factor level-0 pixels,
# read from the coarsest level at or finer than that, by s = p / q; at 1/3 µm (4/3) x 3 it is level 2 itself.
@pytest.mark.parametrize("mpp, factor, level, p, q", [(0.7, 1, 1, 7, 5), (0.7, 2, 2, 7, 5), (0.7, 5, 2, 7, 2),
                                                      (0.7, 3, 2, 21, 10), (1 / 3, 3, 2, 1, 1)])
def test_thumbnail_at_a_resampled_scale(tmp_path, monkeypatch, mpp, factor, level, p, q):
    image = random_image(np.uint16, seed=factor)
    with SlideReader(spec_for(ome_slide(tmp_path, image), None), mpp=mpp) as slide:
        thumb = slide.thumbnail(factor)
        monkeypatch.setattr(views, "SCAN_BYTES", 4096)  # many small windows: the same pixels
        assert np.array_equal(slide.thumbnail(factor), thumb)
        expected = area_means(pyramid_levels(image, 3)[level], p, q)
    assert thumb.dtype == np.float32
    assert thumb.shape == (math.ceil(slide.shape[0] / factor), math.ceil(slide.shape[1] / factor), 4)
    height, width = min(expected.shape[0], thumb.shape[0]), min(expected.shape[1], thumb.shape[1])
    np.testing.assert_allclose(thumb[:height, :width], expected[:height, :width], rtol=1e-6)
    # rows / columns the level's grid ends inside repeat their neighbour
    np.testing.assert_array_equal(thumb[height:], np.broadcast_to(thumb[height - 1:height], thumb[height:].shape))
    np.testing.assert_array_equal(thumb[:, width:], np.broadcast_to(thumb[:, width - 1:width], thumb[:, width:].shape))


def test_validate_at_a_resampled_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(views, "SCAN_BYTES", 4096)  # the scan reads many windows
    flat = np.full((HEIGHT, WIDTH, 4), 100, np.uint8)
    with SlideReader(spec_for(ome_slide(tmp_path / "flat", flat), None), mpp=0.7) as slide:
        with pytest.raises(SlideError, match="empty slide: every pixel is 100"):
            slide.validate()
    flat[40, 60, 1] = 200  # level 1's pixel (20, 30): inside the last windows only
    with SlideReader(spec_for(ome_slide(tmp_path / "one", flat), None), mpp=0.7) as slide:
        slide.validate()


# -- channels by name -------------------------------------------------------------------------------------------
def named_slide(tmp_path, image, layout: str) -> SlideSpec:
    """A 4-channel slide whose channels are named A, B, C, D: by the OME file, or by the manifest."""
    if layout == "ome":
        return spec_for(ome_slide(tmp_path, image), None)
    files = write_layout(tmp_path / "channels", image, "per_channel", channel_names=("w", "x", "y", "z"))
    return spec_for(files, None, channel_names=NAMES, mpp=BASE_MPP)


@pytest.mark.parametrize("layout", ["ome", "per_channel"])
def test_channels_by_name(tmp_path, layout):
    image = random_image(np.uint16)
    spec = named_slide(tmp_path, image, layout)
    with SlideReader(spec, channels=("C", "A")) as slide:
        assert slide.channel_names == ("C", "A") and slide.num_channels == 2
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), image[..., [2, 0]])
        slide.select_channels(("D",))
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), image[..., [3]])
        slide.select_channels(None)
        assert slide.channel_names == NAMES
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), image)
    with pytest.raises(SlideError, match=r"no channel\(s\) named \['X', 'Y'\]; the slide's channels are "
                                         r"\['A', 'B', 'C', 'D'\]"):
        SlideReader(spec, channels=("C", "X", "Y")).__enter__()


@pytest.mark.parametrize("layout", ["ome", "per_channel"])
def test_channels_by_name_with_mpp_and_downsample(tmp_path, layout):
    image = random_image(np.uint8, seed=2)
    spec = named_slide(tmp_path, image, layout)
    chosen = image[..., [2, 0]]
    with SlideReader(spec, mpp=0.35, channels=("C", "A")) as slide:  # level 0 by 1.4
        assert_values_equal(slide.read_region(0, 0, *slide.shape), area_means(chosen, 7, 5), 7)
    # an area mean of 3 x 3 blocks of level 0 (no level has downsample 3); no ties: sums of 9 pixels
    blocks = chosen[: HEIGHT // 3 * 3, : WIDTH // 3 * 3].reshape(HEIGHT // 3, 3, WIDTH // 3, 3, 2).mean(axis=(1, 3))
    with SlideReader(spec, downsample=3, channels=("C", "A")) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), np.rint(blocks))
    if layout == "ome":  # a pyramid level
        with SlideReader(spec, mpp=0.7, channels=("C", "A")) as slide:
            level = pyramid_levels(image, 3)[1][..., [2, 0]]
            assert_values_equal(slide.read_region(0, 0, *slide.shape), area_means(level, 7, 5), 7)
        with SlideReader(spec, downsample=2, channels=("C", "A")) as slide:
            np.testing.assert_array_equal(slide.read_region(0, 0, *slide.shape), pyramid_levels(chosen, 3)[1])


def test_channel_files_not_chosen_are_not_read(tmp_path, monkeypatch):
    image = random_image(np.uint8, seed=6)
    spec = named_slide(tmp_path, image, "per_channel")
    chosen, others = {"y.tif", "w.tif"}, {"x.tif", "z.tif"}  # channels C and A
    read_files = []
    read = TiffLevel.read

    def read_chosen_only(self, rows, cols):
        assert self.file.name not in others, f"{self.file.name} was read"
        read_files.append(self.file.name)
        return read(self, rows, cols)

    monkeypatch.setattr(TiffLevel, "read", read_chosen_only)
    for options in (dict(), dict(mpp=0.35), dict(downsample=3)):
        with SlideReader(spec, channels=("C", "A"), **options) as slide:
            slide.read_region(0, 0, *slide.shape)
            slide.thumbnail(4)
            slide.validate()
    assert set(read_files) == chosen


# -- Aperio SVS ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor, level, p, q", [(2, 1, 1, 1), (2.8, 1, 7, 5), (1.5, 0, 3, 2), (4.4, 2, 11, 10)])
def test_aperio_svs_at_mpp(tmp_path, factor, level, p, q):
    image = random_image(np.uint8, shape=(HEIGHT, WIDTH, 3), seed=8)
    path = write_aperio_svs(tmp_path / "slide.svs", image, 0.499, levels=3)
    with SlideReader(SlideSpec("svs", (path,), None), mpp=0.499 * factor) as slide:
        assert slide.base_mpp == 0.499
        assert slide.scale == pytest.approx(factor, rel=1e-12)
        source = pyramid_levels(image, 3)[level]
        got = slide.read_region(0, 0, *slide.shape)
        if p == q:
            np.testing.assert_array_equal(got, source)
        else:
            assert_values_equal(got, area_means(source, p, q), p)
