"""Direct strip / tile reading (`gerne_jax.slides.tiff_windows`) against tifffile's own whole-page decode."""
from __future__ import annotations

import multiprocessing
import threading
import tracemalloc

import numpy as np
import pytest
import tifffile

from gerne_jax.slides import tiff_levels, tiff_windows
from gerne_jax.slides.manifest import SlideError
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tiff_windows import PageWindows
from tests.tiff_layouts import (
    COMPRESSIONS,
    DTYPES,
    LAYOUTS,
    TILE,
    open_layout,
    random_image,
    spec_for,
    write_layout,
    write_mask,
    write_with_corrupt_tile,
)

CAPACITY = 1 << 30


def strided_windows(shape, count=25, seed=0):
    """(rows, cols) slices with steps 1..6, some starting or ending at the image's edges."""
    rng = np.random.default_rng(seed)
    height, width = shape
    chosen = [(slice(None), slice(None)), (slice(0, height, 4), slice(1, width, 3)), (slice(height - 1, height),
                                                                                      slice(0, width, 7))]
    for _ in range(count):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1))
        chosen.append((slice(y0, y1, int(rng.integers(1, 7))), slice(x0, x1, int(rng.integers(1, 7)))))
    return chosen


def level_windows(file, capacity=CAPACITY):
    """(TiffFile, PageWindows of level 0, the level decoded whole by tifffile as (H, W, C))."""
    tiff = tifffile.TiffFile(file)
    series = tiff.series[0]
    whole = series.asarray()
    axes = series.axes
    if "S" in axes or "C" in axes or "Q" in axes or "I" in axes:
        channel_axis = next(a for a in axes if a not in "YX" and whole.shape[axes.index(a)] > 1)
        whole = np.moveaxis(whole, axes.index(channel_axis), -1)
    else:
        whole = whole[..., None]
    whole = whole.reshape(whole.shape[-3:])
    windows = PageWindows.of_level(series, whole.shape[-1])
    if windows is not None:
        windows.set_cache_bytes(capacity)
    return tiff, windows, whole


def test_overlap_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3000):
        start, step = int(rng.integers(0, 50)), int(rng.integers(1, 9))
        stop = int(rng.integers(start, 90))
        segment_start = int(rng.integers(0, 80))
        segment_stop = segment_start + int(rng.integers(1, 20))
        visited = np.arange(start, stop, step)
        inside = np.flatnonzero((visited >= segment_start) & (visited < segment_stop))
        found = tiff_windows._overlap(start, stop, step, segment_start, segment_stop)
        if not inside.size:
            assert found is None
            continue
        window_part, segment_part = found
        np.testing.assert_array_equal(np.arange(len(visited))[window_part], inside)
        np.testing.assert_array_equal(np.arange(segment_start, segment_stop)[segment_part], visited[inside])


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout not in ("per_channel",)])
@pytest.mark.parametrize("storage", [dict(tile=TILE, compression="zlib"), dict(rowsperstrip=7),
                                     dict(rowsperstrip=1000, compression="lzw")],
                         ids=["tiled-zlib", "strips-raw", "one-strip-lzw"])
def test_strided_windows_equal_tifffiles_decode(tmp_path, layout, storage):
    """Every layout the reader supports reads through `PageWindows`, and windows with steps equal
    numpy slicing of tifffile's whole-page decode (stripped, tiled, a strip taller than the image)."""
    image = random_image(np.uint16, seed=5)
    files = write_layout(tmp_path / "img", image, layout, **storage)
    tiff, windows, whole = level_windows(files[0])
    with tiff:
        assert windows is not None, layout
        np.testing.assert_array_equal(whole, image)
        for rows, cols in strided_windows(image.shape[:2]):
            np.testing.assert_array_equal(windows.read(rows, cols), image[rows, cols], err_msg=f"{rows} {cols}")


@pytest.mark.parametrize("dtype", [*DTYPES, bool])
@pytest.mark.parametrize("compression", [*COMPRESSIONS, "packbits"])
def test_dtypes_and_compressions(tmp_path, dtype, compression):
    """uint8 / uint16 / float32 slides and 1-bit masks, every lossless compression, big-endian too."""
    image = random_image(np.uint8 if dtype is bool else dtype, shape=(45, 67, 1), seed=2)
    image = (image > 127) if dtype is bool else image
    for byteorder in "<>":
        file = tmp_path / f"{byteorder == '>'}-{compression}.tif"
        tifffile.imwrite(file, image[..., 0], tile=TILE, compression=compression, byteorder=byteorder,
                         photometric="minisblack")
        tiff, windows, whole = level_windows(file)
        with tiff:
            assert windows.dtype == whole.dtype
            np.testing.assert_array_equal(whole, image)
            for rows, cols in strided_windows(image.shape[:2], count=8):
                np.testing.assert_array_equal(windows.read(rows, cols), image[rows, cols])


def test_jpeg_windows_equal_tifffiles_decode(tmp_path):
    """Lossy JPEG (shared tables in the file): the windows equal tifffile's own decode exactly."""
    yy, xx = np.mgrid[:70, :90]
    image = np.stack([120 + 60 * np.sin(yy / 7 + c) * np.cos(xx / 9) for c in range(3)], -1).astype(np.uint8)
    file = tmp_path / "rgb.tif"
    tifffile.imwrite(file, image, tile=(32, 32), compression="jpeg", photometric="rgb")
    tiff, windows, whole = level_windows(file)
    with tiff:
        for rows, cols in strided_windows(image.shape[:2]):
            np.testing.assert_array_equal(windows.read(rows, cols), whole[rows, cols])


def test_empty_tiles_read_as_tifffile_fills_them(tmp_path):
    """A sparse file (tiles never written: offset and byte count 0) reads as tifffile fills them."""
    image = random_image(np.uint8, shape=(48, 64, 1), seed=4)[..., 0]
    tiles = [None if (ty + tx) % 3 == 1 else image[ty * 16:ty * 16 + 16, tx * 16:tx * 16 + 16]
             for ty in range(3) for tx in range(4)]
    file = tmp_path / "sparse.tif"
    tifffile.imwrite(file, iter(tiles), shape=image.shape, dtype=np.uint8, tile=(16, 16),
                     photometric="minisblack")
    tiff, windows, whole = level_windows(file)
    with tiff:
        assert (np.asarray(tiff.pages[0].databytecounts) == 0).sum() == 4
        np.testing.assert_array_equal(windows.read(slice(None), slice(None)), whole)
        for rows, cols in strided_windows(image.shape):
            np.testing.assert_array_equal(windows.read(rows, cols), whole[rows, cols])


def test_concurrent_reads_decode_each_segment_once(tmp_path):
    """Threads reading overlapping windows at once get exact windows, and no segment is decoded twice."""
    image = random_image(np.uint8, shape=(200, 300, 3), seed=6)
    file = tmp_path / "big.tif"
    tifffile.imwrite(file, image, tile=(16, 16), compression="zlib", photometric="rgb")
    tiff, windows, _ = level_windows(file)
    decoded = []
    resolve = windows._resolve

    def counting_resolve(future, key, *args):
        decoded.append(key)
        return resolve(future, key, *args)

    windows._resolve = counting_resolve
    failures = []

    def reader(seed):
        try:
            for rows, cols in strided_windows(image.shape[:2], count=15, seed=seed):
                np.testing.assert_array_equal(windows.read(rows, cols), image[rows, cols])
        except AssertionError as error:
            failures.append(error)

    with tiff:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures
    assert len(decoded) == len(set(decoded)) == 13 * 19  # every tile once; the cache holds them all


def test_small_cache_only_misses(tmp_path):
    """A cache of one segment decodes segments again, and windows stay exact."""
    image = random_image(np.uint16, shape=(60, 70, 2), seed=7)
    file = tmp_path / "small.tif"
    tifffile.imwrite(file, image, tile=(16, 16), compression="zstd", photometric="minisblack",
                     planarconfig="contig")
    tiff, windows, _ = level_windows(file, capacity=1)
    with tiff:
        for rows, cols in strided_windows(image.shape[:2]):
            np.testing.assert_array_equal(windows.read(rows, cols), image[rows, cols])


def test_corrupt_tile_is_a_slide_error_every_time(tmp_path):
    """A tile that fails to decode names the file, in every read that needs it (the failure is not
    cached as a result, and no reading thread is left waiting)."""
    image = random_image(np.uint8, shape=(64, 64, 3), seed=8)
    good = write_layout(tmp_path / "good", image, "interleaved", tile=(16, 16), compression="zlib")[0]
    bad = write_with_corrupt_tile(good, tmp_path / "bad.tif")
    spec = spec_for([bad], write_mask(tmp_path / "mask.tif", np.zeros((64, 64), np.uint8)))
    with SlideReader(spec) as reader:
        assert reader._image.sources[0]._windows is not None
        for _ in range(2):
            with pytest.raises(SlideError, match="bad.tif.*cannot read TIFF data"):
                reader.read_region(0, 0, 64, 64)


@pytest.mark.parametrize("layout", ["interleaved", "planar", "ome"])
def test_zarr_fallback_reads_the_same_windows(tmp_path, layout, monkeypatch):
    """Layouts `PageWindows` leaves out read through tifffile's zarr store: forced here, same windows."""
    image = random_image(np.uint16, seed=9)
    spec = open_layout(tmp_path, image, layout, tile=TILE, compression="zlib")
    monkeypatch.setattr(PageWindows, "of_level", classmethod(lambda cls, *args: None))
    with SlideReader(spec) as reader:
        assert reader._image.sources[0]._windows is None
        for rows, cols in strided_windows(image.shape[:2], count=10):
            np.testing.assert_array_equal(reader._image.sources[0].read(rows, cols), image[rows, cols])


def test_volume_pages_fall_back_to_zarr(tmp_path):
    """A page with depth (a volume tile) is not a layout `PageWindows` reads."""
    volume = random_image(np.uint8, shape=(4, 32, 32), seed=10)
    file = tmp_path / "volume.tif"
    tifffile.imwrite(file, volume, tile=(2, 16, 16), photometric="minisblack", volumetric=True)
    with tifffile.TiffFile(file) as tiff:
        assert tiff.pages[0].imagedepth == 4
        assert PageWindows.of_level(tiff.series[0], 1) is None


def test_reader_uses_direct_windows_for_masks(tmp_path):
    """Tumour masks read through `PageWindows` as well (subsampled reads of a level-0 mask included)."""
    mask = (random_image(np.uint8, shape=(45, 67, 1), seed=11)[..., 0] > 200).astype(np.uint8)
    spec = open_layout(tmp_path, random_image(np.uint8), "interleaved", mask=mask)
    with SlideReader(spec) as reader:
        assert isinstance(reader._tumour.source, tiff_levels.TiffLevel) and reader._tumour.source._windows is not None
        np.testing.assert_array_equal(reader.read_tumour(0, 0, 45, 67), mask != 0)


@pytest.mark.parametrize("layout", ["interleaved", "planar", "multipage", "ome"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_uncompressed_pages_are_memory_mapped(tmp_path, layout, byteorder):
    """Uncompressed pages in one piece are sliced from a memory map, in every layout and byte order."""
    image = random_image(np.uint16, seed=12)
    files = write_layout(tmp_path / "img", image, layout, rowsperstrip=image.shape[0])
    if byteorder == ">":  # the same pixels, big-endian
        with tifffile.TiffFile(files[0]) as tiff:
            data, metadata = tiff.series[0].asarray(), tiff.series[0].axes
        files = [tmp_path / "big_endian.tif"]
        tifffile.imwrite(files[0], data, byteorder=">", photometric="minisblack",
                         planarconfig={"planar": "separate", "interleaved": "contig"}.get(layout),
                         metadata={"axes": metadata})
    tiff, windows, whole = level_windows(files[0])
    with tiff:
        assert windows._mapped is not None
        np.testing.assert_array_equal(whole, image)
        for rows, cols in strided_windows(image.shape[:2]):
            window = windows.read(rows, cols)
            assert window.dtype == np.dtype(np.uint16) and window.dtype.isnative
            np.testing.assert_array_equal(window, image[rows, cols])


def test_window_of_a_single_strip_image_reads_only_its_bytes(tmp_path):
    """A 2,000 x 3,000 uint16 image in one uncompressed strip (tifffile's default, ImageJ's too): a small
    window costs memory for its own pixels, not the page's 12 MB."""
    rng = np.random.default_rng(13)
    image = rng.integers(0, 65535, (2000, 3000), dtype=np.uint16)
    file = tmp_path / "one_strip.tif"
    tifffile.imwrite(file, image, photometric="minisblack")
    tiff, windows, _ = level_windows(file)
    with tiff:
        assert len(tiff.pages[0].dataoffsets) == 1
        tracemalloc.start()
        window = windows.read(slice(1500, 1540), slice(2000, 2030))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    np.testing.assert_array_equal(window[..., 0], image[1500:1540, 2000:2030])
    assert peak < 1 << 20


def _read_in_child(file, queue):
    tiff, windows, whole = level_windows(file)
    with tiff:
        queue.put(bool(np.array_equal(windows.read(slice(None), slice(None)), whole)))


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's warning; the child reads TIFFs only
def test_a_forked_child_decodes_with_its_own_pool(tmp_path):
    """The parent's decoding pool has no threads in a forked child (multiprocessing's default on Linux):
    the child gets a pool of its own instead of waiting forever on the parent's."""
    image = random_image(np.uint8, shape=(64, 64, 3), seed=14)
    file = tmp_path / "tiles.tif"
    tifffile.imwrite(file, image, tile=(16, 16), compression="zlib", photometric="rgb")
    tiff, windows, _ = level_windows(file)
    with tiff:
        windows.read(slice(None), slice(None))  # several tiles: the parent's pool is running
    assert tiff_windows._pool is not None
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(file, queue))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=5)
