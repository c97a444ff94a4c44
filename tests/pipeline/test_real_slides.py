"""`gerne-jax tile` on real-slide inputs: QuPath annotations, --mpp, mixed scales, --channels, their errors, resume.

Slides are small arrays written in tmp_path with tifffile (OME-TIFF stating PhysicalSizeX for a pixel size);
annotation files are GeoJSON written from the same rectangles that a numpy mask is painted with. Every
expected patch comes from a computation independent of the tiler: rectangles painted or pixel centres tested
against them directly, area coverage as exact integer block sums of a supersampled mask, numpy crops, block
means and moments, option and key sets written out by hand.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tifffile

from data_pipeline.__main__ import main
from gerne_jax.core.cli import run_command
from gerne_jax.data import dataset
from gerne_jax.slides.scan import SIDECAR_VERSION, TilingConfig, config_on_disk
from tests.helpers import RUN_SPECIFIC, folder_bytes
from tests.tiff_layouts import pyramid_levels

pytestmark = pytest.mark.filterwarnings("ignore:split '(train|validation|test)' has no patches")

MANIFEST_COLUMNS = ["slide_id", "image", "mask", "annotations", "tissue_mask", "patient_id", "split",
                    "channel_names", "mpp"]
TUMOUR_FRACTION, MIN_TUMOUR = dataset.on_disk("tumour_fraction"), "min_tumor_pixels"


# -- Files, manifests, runs --------------------------------------------------------------------------------------------
def write_manifest(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in MANIFEST_COLUMNS} for row in rows)
    return path


def write_mask(path: pathlib.Path, mask: np.ndarray) -> str:
    tifffile.imwrite(path, mask.astype(np.uint8))
    return path.name


def write_ome(path: pathlib.Path, image: np.ndarray, mpp: float, levels: int = 1,
              names: tuple[str, ...] | None = None) -> str:
    """`image` (H, W, C) as a tiled OME-TIFF stating `mpp` µm per pixel, with `levels` - 1 reduced levels in
    SubIFDs (`pyramid_levels`: 2 x 2 striding); returns the file name."""
    metadata = {"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm"}
    if names is not None:
        metadata["Channel"] = {"Name": list(names)}
    with tifffile.TiffWriter(path, ome=True) as writer:
        for i, level in enumerate(pyramid_levels(image, levels)):
            writer.write(np.ascontiguousarray(np.moveaxis(level, -1, 0)), photometric="minisblack", tile=(16, 16),
                         **(dict(subifds=levels - 1, metadata=metadata) if i == 0 else dict(subfiletype=1)))
    return path.name


def tile(manifest: pathlib.Path, out: pathlib.Path, *options: object) -> None:
    assert main(["tile", "--manifest", str(manifest), "--out", str(out), *map(str, options)]) == 0


def cli_error(monkeypatch, capsys, *args: object) -> str:
    """The one `error: ...` line of `gerne-jax tile ARGS` run through the command-line entry (exit status 2)."""
    # run_command wraps the unraisable hook and sets a default TensorFlow log level: both are put back after the test
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setitem(os.environ, "TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(["tile", *map(str, args)]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def read_split(data_dir: pathlib.Path, split: str) -> list[dict]:
    source = tfds.builder_from_directory(os.fspath(data_dir)).as_data_source(split)
    return [source[i] for i in range(len(source))]


def slides_of(data_dir: pathlib.Path) -> dict[str, str]:
    """Slide id -> status in the tiling report."""
    report = json.loads((data_dir / "tiling_report.json").read_text())
    return {slide_id: entry["status"] for slide_id, entry in report["slides"].items()}


# -- The truth ---------------------------------------------------------------------------------------------------------
def expected_patches(image: np.ndarray, tumour: np.ndarray, tissue: np.ndarray, P: int, S: int,
                     scale: float) -> list[dict]:
    """The kept patches (tissue ratio > 0, from `tissue` alone) of full arrays at the tiled grid, row-major; x, y
    at level 0."""
    patches = []
    for y in range(0, tumour.shape[0] - P + 1, S):
        for x in range(0, tumour.shape[1] - P + 1, S):
            tumour_pixels, tissue_pixels = int(tumour[y:y + P, x:x + P].sum()), int(tissue[y:y + P, x:x + P].sum())
            if tissue_pixels:
                patches.append({"image": image[y:y + P, x:x + P], "x": round(x * scale), "y": round(y * scale),
                                "label": int(tumour_pixels >= 1),
                                "tumour_fraction": np.float32(tumour_pixels / P**2),
                                "tissue_ratio": np.float32(tissue_pixels / P**2)})
    return patches


def assert_patches(found: list[dict], expected: list[dict], images: bool = True) -> None:
    assert len(found) == len(expected) > 0
    for got, want in zip(found, expected):
        assert (got["x"], got["y"], got["label"]) == (want["x"], want["y"], want["label"])
        assert (got[TUMOUR_FRACTION], got["tissue_ratio"]) == (want["tumour_fraction"], want["tissue_ratio"])
        if images:
            np.testing.assert_array_equal(got["image"], want["image"])


def blocky(rng: np.random.Generator, shape: tuple[int, int], cell: int, fill: float) -> np.ndarray:
    """Random regions of `cell` x `cell` squares, cropped to `shape`."""
    coarse = rng.random((shape[0] // cell + 1, shape[1] // cell + 1)) < fill
    return np.kron(coarse, np.ones((cell, cell), bool))[:shape[0], :shape[1]]


def area_means(array: np.ndarray, p: int, q: int) -> np.ndarray:
    """Area means (float64) of (H, W[, C]) on a grid of p/q pixels a side, exactly: each pixel becomes q x q fine
    pixels and grid pixel (i, j) is the p x p block of them at (i, j). A mask's coverage is its means >= 1/2."""
    fine = np.repeat(np.repeat(array.astype(np.float64), q, axis=0), q, axis=1)
    h, w = fine.shape[0] // p, fine.shape[1] // p
    return fine[:h * p, :w * p].reshape(h, p, w, p, *fine.shape[2:]).mean(axis=(1, 3))


# -- 1. QuPath annotations equal raster masks --------------------------------------------------------------------------
# (outer, holes) as (row0, row1, col0, col1): level-0 rows [row0, row1), columns [col0, col1). Odd edges, so the
# centre rule at downsample 2 and the top-left pixel of a 2 x 2 block disagree along them.
TUMOUR_POLYGONS = [((37, 171, 45, 203), [(81, 129, 95, 151)]), ((151, 261, 181, 333), [])]
TUMOUR_MULTIPOLYGON = [((289, 341, 401, 467), []), ((11, 61, 411, 489), [])]
TISSUE_POLYGONS = [((21, 363, 29, 481), [(199, 241, 379, 421)]), ((365, 383, 3, 101), [])]
SHAPE = (384, 512)


def ring(rows_cols: tuple[int, int, int, int]) -> list[list[float]]:
    """The closed GeoJSON ring ([x, y] points) of a rectangle of pixel edges."""
    r0, r1, c0, c1 = rows_cols
    return [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]


def polygon(outer, holes) -> list:
    return [ring(outer), *(ring(hole) for hole in holes)]


def feature(name: str | None, geometry: dict) -> dict:
    properties = {"objectType": "annotation"}
    if name is not None:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "id": f"id-{name}", "geometry": geometry, "properties": properties}


def write_geojson(path: pathlib.Path) -> str:
    """Tumour (two Polygons, one with a hole, and a MultiPolygon), tissue, and what must be ignored: a Stroma
    triangle over tumour-free tissue, an unclassified rectangle and a Tumor point."""
    features = [feature("Tumor", {"type": "Polygon", "coordinates": polygon(*shape)}) for shape in TUMOUR_POLYGONS]
    features += [
        feature("Tumor", {"type": "MultiPolygon", "coordinates": [polygon(*shape) for shape in TUMOUR_MULTIPOLYGON]}),
        feature("Stroma", {"type": "Polygon", "coordinates": [[[30, 200], [170, 360], [30, 360], [30, 200]]]}),
        feature(None, {"type": "Polygon", "coordinates": [ring((300, 360, 250, 300))]}),
        feature("Tumor", {"type": "Point", "coordinates": [100, 300]}),
        *(feature("Tissue", {"type": "Polygon", "coordinates": polygon(*shape)}) for shape in TISSUE_POLYGONS)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path.name


def paint(shapes) -> np.ndarray:
    """The level-0 mask of a union of rectangles with rectangular holes, painted with numpy."""
    mask = np.zeros(SHAPE, bool)
    for (r0, r1, c0, c1), holes in shapes:
        part = np.zeros(SHAPE, bool)
        part[r0:r1, c0:c1] = True
        for h0, h1, g0, g1 in holes:
            part[h0:h1, g0:g1] = False
        mask |= part
    return mask


def centres_inside(shapes, grid_shape: tuple[int, int], scale: float) -> np.ndarray:
    """Grid pixels of `scale` level-0 pixels whose centre ((i + .5) * scale, (j + .5) * scale) is inside."""
    cy = (np.arange(grid_shape[0]) + 0.5) * scale
    cx = (np.arange(grid_shape[1]) + 0.5) * scale

    def rectangle(r0, r1, c0, c1):
        return ((r0 <= cy) & (cy < r1))[:, None] & ((c0 <= cx) & (cx < c1))[None, :]

    inside = np.zeros(grid_shape, bool)
    for outer, holes in shapes:
        part = rectangle(*outer)
        for hole in holes:
            part &= ~rectangle(*hole)
        inside |= part
    return inside


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """One slide (384 x 512, 3 channels) with its tumour and tissue as painted masks and as GeoJSON."""
    root = tmp_path_factory.mktemp("annotated")
    rng = np.random.default_rng(10)
    tissue = paint(TISSUE_POLYGONS)
    image = (rng.integers(0, 40, (*SHAPE, 3)) + np.where(tissue, 150, 0)[..., None]).astype(np.uint8)
    tifffile.imwrite(root / "s.tif", image, photometric="rgb", tile=(32, 32))
    files = {"image": "s.tif", "annotations": write_geojson(root / "s.geojson"),
             "mask": write_mask(root / "s_tumour.tif", paint(TUMOUR_POLYGONS + TUMOUR_MULTIPOLYGON)),
             "tissue_mask": write_mask(root / "s_tissue.tif", tissue)}
    return root, image, files


def comparable(data_dir: pathlib.Path) -> dict[str, object]:
    """Every file of a DATA_DIR but the lock; the tiling report's slides and the sidecars without their
    fingerprint (its settings and source files differ between a mask and annotations by design)."""
    found: dict[str, object] = {}
    for name, data in folder_bytes(data_dir).items():
        if name in RUN_SPECIFIC:
            continue
        if name == "tiling_report.json":
            found[name] = json.loads(data)["slides"]
        elif name.startswith(".work/") and name.endswith(".json"):
            found[name] = {key: value for key, value in json.loads(data).items() if key != "fingerprint"}
        else:
            found[name] = data
    return found


@pytest.mark.parametrize("with_tissue", [False, True], ids=["detected_tissue", "tissue_classes"])
def test_annotations_tile_like_the_painted_masks_at_level_0(annotated, tmp_path, with_tissue):
    root, _, files = annotated
    row = {"slide_id": "s", "image": files["image"], "split": "train"}
    name = "tissue" if with_tissue else "detected"  # manifests beside the slide's files
    tissue_mask = files["tissue_mask"] if with_tissue else ""
    masks = write_manifest(root / f"{name}_masks.csv", [dict(row, mask=files["mask"], tissue_mask=tissue_mask)])
    annotations = write_manifest(root / f"{name}_annotations.csv", [dict(row, annotations=files["annotations"])])
    options = ["--patch-size", 32, "--stride", 24, "--tissue-factor", 4]
    tile(masks, tmp_path / "masks", *options)
    tile(annotations, tmp_path / "annotations", *options, "--tumour-classes", "Tumor",
         *(["--tissue-classes", "Tissue"] if with_tissue else []))
    from_masks = comparable(tmp_path / "masks")
    assert {"patches.csv", "metadata.json", "qc/s.png", ".work/s.json", "tiling_report.json"} <= set(from_masks)
    assert any(name.startswith("gerne_patches-train.array_record") for name in from_masks)
    assert comparable(tmp_path / "annotations") == from_masks
    labels = [patch["label"] for patch in read_split(tmp_path / "annotations", "train")]
    assert 0 < sum(labels) < len(labels)


def test_annotations_at_downsample_2_follow_the_pixel_centres(annotated, tmp_path):
    root, image, files = annotated
    manifest = write_manifest(root / "downsample.csv", [{"slide_id": "s", "image": files["image"], "split": "train",
                                                          "annotations": files["annotations"]}])
    P, S = 16, 12
    tile(manifest, tmp_path / "out", "--patch-size", P, "--stride", S, "--downsample", 2,
         "--tumour-classes", "Tumor", "--tissue-classes", "Tissue")
    grid = (SHAPE[0] // 2, SHAPE[1] // 2)
    tumour = centres_inside(TUMOUR_POLYGONS + TUMOUR_MULTIPOLYGON, grid, 2.0)
    tissue = centres_inside(TISSUE_POLYGONS, grid, 2.0)
    # The centre rule is not the top-left pixel of each 2 x 2 block (what a raster mask of level 0 gives).
    assert (tumour != paint(TUMOUR_POLYGONS + TUMOUR_MULTIPOLYGON)[::2, ::2]).any()
    means = np.rint(image.reshape(grid[0], 2, grid[1], 2, 3).mean(axis=(1, 3), dtype=np.float64)).astype(np.uint8)
    assert_patches(read_split(tmp_path / "out", "train"), expected_patches(means, tumour, tissue, P, S, 2))
    assert dataset.read_metadata(tmp_path / "out")["level_downsample"] == 2


# -- 2. --mpp end to end; 3. mixed scales without it -------------------------------------------------------------------
@pytest.fixture(scope="module")
def physical(tmp_path_factory):
    """Slides a (0.25 µm, pyramid of 2 levels), b (0.25 µm, no pyramid), c (0.5 µm, pyramid) with level-0
    tumour and tissue masks whose edges (7- and 9-pixel blocks) cut the 2 x 2 blocks of the 0.25-µm slides."""
    root = tmp_path_factory.mktemp("physical")
    rng = np.random.default_rng(20)
    slides = {}
    for slide_id, shape, mpp, levels, split in (("a", (256, 320), 0.25, 2, "train"),
                                                ("b", (250, 302), 0.25, 1, "validation"),
                                                ("c", (128, 144), 0.5, 2, "test")):
        image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
        tissue, tumour = blocky(rng, shape, 9, 0.6), blocky(rng, shape, 7, 0.3)
        slides[slide_id] = {"image": image, "tumour": tumour, "tissue": tissue, "mpp": mpp, "row": {
            "slide_id": slide_id, "image": write_ome(root / f"{slide_id}.ome.tif", image, mpp, levels),
            "mask": write_mask(root / f"{slide_id}_tumour.tif", tumour),
            "tissue_mask": write_mask(root / f"{slide_id}_tissue.tif", tissue), "split": split}}
    return root, slides


@pytest.fixture(scope="module")
def at_half_micron(physical):
    root, slides = physical
    manifest = write_manifest(root / "manifest.csv", [slide["row"] for slide in slides.values()])
    tile(manifest, root / "mpp", "--patch-size", 16, "--stride", 12, "--mpp", 0.5)
    return manifest, root / "mpp"


@pytest.mark.parametrize("slide_id, split", [("a", "train"),
                                             ("b", "validation"), ("c", "test")])
def test_mpp_patches_are_the_slides_pixels_and_mask_coverage_at_that_scale(physical, at_half_micron, slide_id,
                                                                           split):
    _, slides = physical
    _, out = at_half_micron
    slide = slides[slide_id]
    if slide_id == "a":  # 0.25 µm: level 1 of the pyramid (2 x 2 striding)
        image = pyramid_levels(slide["image"], 2)[1]
    elif slide_id == "b":  # 0.25 µm without a pyramid: the area mean of 2 x 2 blocks
        image = np.rint(area_means(slide["image"], 2, 1)).astype(np.uint8)
    else:  # 0.5 µm: level 0 as it is
        image = slide["image"]
    factor = round(0.5 / slide["mpp"])
    expected = expected_patches(image, area_means(slide["tumour"], factor, 1) >= 0.5,
                                area_means(slide["tissue"], factor, 1) >= 0.5,
                                16, 12, factor)
    assert_patches(read_split(out, split), expected)


def test_mpp_patches_cover_one_physical_size(physical, at_half_micron):
    _, slides = physical
    _, out = at_half_micron
    # A grid step is S * 0.5 µm on every slide: 2 S level-0 pixels of 0.25 µm, S of 0.5 µm.
    for slide_id, split in (("a", "train"), ("b", "validation"), ("c", "test")):
        xs, ys = ({patch[axis] for patch in read_split(out, split)} for axis in ("x", "y"))
        step = round(12 * 0.5 / slides[slide_id]["mpp"])
        assert min(xs) % step == 0 and min(np.diff(sorted(xs))) == step and min(np.diff(sorted(ys))) == step
    meta = dataset.read_metadata(out)
    assert (meta["mpp"], meta["level_downsample"], meta["patch_size"]) == (0.5, None, 16)
    assert meta["channel_names"] == ["channel_0", "channel_1", "channel_2"]


def test_mpp_at_a_non_integer_scale_covers_by_area(tmp_path):
    """--mpp 0.6 on a 0.25-µm slide: 2.4 level-0 pixels per pixel read (12/5: exact on a 5x supersampled grid)."""
    rng = np.random.default_rng(21)
    shape, P, S = (240, 264), 16, 16
    image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    tissue, tumour = blocky(rng, shape, 9, 0.6), blocky(rng, shape, 7, 0.3)
    manifest = write_manifest(tmp_path / "m.csv", [{
        "slide_id": "d", "image": write_ome(tmp_path / "d.ome.tif", image, 0.25), "split": "train",
        "mask": write_mask(tmp_path / "d_tumour.tif", tumour),
        "tissue_mask": write_mask(tmp_path / "d_tissue.tif", tissue)}])
    tile(manifest, tmp_path / "out", "--patch-size", P, "--stride", S, "--mpp", 0.6)
    means = area_means(image, 12, 5)
    assert means.shape[:2] == (100, 110)
    expected = expected_patches(means, area_means(tumour, 12, 5) >= 0.5, area_means(tissue, 12, 5) >= 0.5, P, S, 2.4)
    found = read_split(tmp_path / "out", "train")
    assert_patches(found, expected, images=False)
    for got, want in zip(found, expected):  # means rounded to the nearest integer; a tie (k + 1/2) either way
        tie = np.abs(want["image"] - np.floor(want["image"]) - 0.5) < 1e-6
        np.testing.assert_array_equal(got["image"][~tie], np.rint(want["image"][~tie]))
        np.testing.assert_allclose(np.abs(got["image"][tie] - want["image"][tie]), 0.5, atol=1e-6)
    assert dataset.read_metadata(tmp_path / "out")["mpp"] == 0.6


def scale_warnings(manifest: pathlib.Path, out: pathlib.Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tile(manifest, out, "--patch-size", 16)
    return [str(w.message) for w in caught if "physical scales" in str(w.message)]


def test_mixed_scales_without_mpp_warn_naming_the_slides(physical, at_half_micron, tmp_path):
    manifest, _ = at_half_micron
    (message,) = scale_warnings(manifest, tmp_path / "mixed")
    assert "µm/pixel: a 0.25, b 0.25, c 0.5" in message and "--mpp" in message
    assert dataset.read_metadata(tmp_path / "mixed")["mpp"] is None


def test_scales_within_ten_percent_or_unknown_do_not_warn(physical, tmp_path):
    root, slides = physical
    rows = [slides["a"]["row"], slides["b"]["row"]]
    assert scale_warnings(write_manifest(root / "equal.csv", rows), tmp_path / "equal") == []
    assert dataset.read_metadata(tmp_path / "equal")["mpp"] == 0.25
    # The manifest's mpp overrides the file's: 0.25 and 0.27 are 8 % apart; their median is the dataset's.
    near = write_manifest(root / "near.csv", [rows[0], dict(rows[1], mpp="0.27")])
    assert scale_warnings(near, tmp_path / "near") == []
    assert dataset.read_metadata(tmp_path / "near")["mpp"] == pytest.approx((0.25 + 0.27) / 2, rel=1e-12)
    # 0.25 and 0.28 are 12 % apart.
    (message,) = scale_warnings(write_manifest(root / "far.csv", [rows[0], dict(rows[1], mpp="0.28")]),
                                tmp_path / "far")
    assert "a 0.25, b 0.28" in message
    assert dataset.read_metadata(tmp_path / "far")["mpp"] is None
    # A slide that states no pixel size (tifffile's ResolutionUnit NONE): no scale to compare, no common one.
    tifffile.imwrite(root / "plain.tif", slides["b"]["image"], photometric="rgb")
    unknown = write_manifest(root / "unknown.csv", [rows[0], dict(rows[1], image="plain.tif")])
    assert scale_warnings(unknown, tmp_path / "unknown") == []
    assert dataset.read_metadata(tmp_path / "unknown")["mpp"] is None



# -- 4. --channels -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_channels(tmp_path_factory):
    """Slides p (names from the manifest) and q (from its OME channel names), channels A, B, C, D."""
    root = tmp_path_factory.mktemp("channels")
    rng = np.random.default_rng(30)
    rows, images = [], {}
    for slide_id, split in (("p", "train"), ("q", "validation")):
        images[slide_id] = rng.integers(0, 4000, (64, 80, 4)).astype(np.uint16)
        tissue = blocky(rng, (64, 80), 5, 0.5)
        row = {"slide_id": slide_id, "split": split,
               "mask": write_mask(root / f"{slide_id}_tumour.tif", blocky(rng, (64, 80), 6, 0.3)),
               "tissue_mask": write_mask(root / f"{slide_id}_tissue.tif", tissue)}
        if slide_id == "p":
            tifffile.imwrite(root / "p.tif", images["p"])
            row.update(image="p.tif", channel_names="A;B;C;D")
        else:
            row["image"] = write_ome(root / "q.ome.tif", images["q"], 0.5, names=("A", "B", "C", "D"))
        rows.append(row)
    return root, write_manifest(root / "manifest.csv", rows), images


def test_channels_by_name_in_the_order_named(four_channels, tmp_path):
    _, manifest, images = four_channels
    P = 16
    tile(manifest, tmp_path / "out", "--patch-size", P, "--channels", "C,A")
    train = read_split(tmp_path / "out", "train")
    for split, slide_id in (("train", "p"), ("validation", "q")):
        chosen = images[slide_id][..., [2, 0]]
        for patch in read_split(tmp_path / "out", split):
            x, y = patch["x"], patch["y"]
            np.testing.assert_array_equal(patch["image"], chosen[y:y + P, x:x + P])
    meta = dataset.read_metadata(tmp_path / "out")
    assert meta["channel_names"] == ["C", "A"]
    pixels = np.stack([patch["image"] for patch in train]).astype(np.float64)
    assert pixels.shape[-1] == 2
    np.testing.assert_allclose(meta["channel_mean"], pixels.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(meta["channel_std"], pixels.std(axis=(0, 1, 2)), rtol=1e-9)


def test_an_unknown_channel_name_is_one_line_naming_it_and_the_slide(four_channels, tmp_path, monkeypatch, capsys):
    root, manifest, _ = four_channels
    line = cli_error(monkeypatch, capsys, "--manifest", manifest, "--out", tmp_path / "out", "--patch-size", 16,
                     "--channels", "C,E")
    assert f"slide 'p', file '{root / 'p.tif'}'" in line and "no channel(s) named ['E']" in line
    assert "['A', 'B', 'C', 'D']" in line


# -- 5. Errors: one line naming the file (or the option) ---------------------------------------------------------------
@pytest.fixture()
def small_slide(tmp_path):
    """A 64 x 64 slide stating 0.5 µm per pixel, its tumour mask, and a manifest row of both."""
    rng = np.random.default_rng(40)
    row = {"slide_id": "s", "split": "train",
           "image": write_ome(tmp_path / "s.ome.tif", rng.integers(0, 256, (64, 64, 3)).astype(np.uint8), 0.5),
           "mask": write_mask(tmp_path / "s_tumour.tif", blocky(rng, (64, 64), 8, 0.3))}
    return tmp_path, row


def tile_error(monkeypatch, capsys, folder: pathlib.Path, rows: list[dict], *options: object) -> str:
    manifest = write_manifest(folder / "m.csv", rows)
    return cli_error(monkeypatch, capsys, "--manifest", manifest, "--out", folder / "out", "--patch-size", 16,
                     *options)


def test_annotation_errors_name_the_file(small_slide, monkeypatch, capsys):
    folder, row = small_slide
    (folder / "broken.geojson").write_text('{"type": "FeatureCollection",\n "features": [}')
    (folder / "stroma.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature("Stroma", {"type": "Polygon", "coordinates": [ring((0, 30, 0, 30))]})]}))
    annotated = dict(row, mask="", annotations="stroma.geojson")
    cases = [
        (dict(annotated, annotations="broken.geojson"), ["--tumour-classes", "Tumor"],
         [f"file '{folder / 'broken.geojson'}'", "not valid JSON", "line 2 column"]),
        (annotated, ["--tumour-classes", "Tumor"],
         [f"file '{folder / 'stroma.geojson'}'", "no polygon of class(es) ['Tumor']", "classes present: ['Stroma']"]),
        (annotated, ["--tumour-classes", "Stroma", "--tissue-classes", "Tissue"],
         [f"file '{folder / 'stroma.geojson'}'", "no polygon of class(es) ['Tissue']", "--tissue-classes"]),
        (annotated, [], [f"file '{folder / 'stroma.geojson'}'", "annotations need --tumour-classes"]),
        (dict(row, annotations="stroma.geojson"), ["--tumour-classes", "Stroma"],
         [f"file '{folder / 'm.csv'}'", "give 'mask' or 'annotations', not both", "manifest line 2"]),
    ]
    for manifest_row, options, fragments in cases:
        line = tile_error(monkeypatch, capsys, folder, [manifest_row], *options)
        assert line.startswith("error: slide 's', ") and all(fragment in line for fragment in fragments), line
    assert not (folder / "out" / "dataset_info.json").exists()


def test_pixel_size_errors_name_the_value_or_the_file(small_slide, monkeypatch, capsys):
    folder, row = small_slide
    for value in ("0", "-1"):
        line = tile_error(monkeypatch, capsys, folder, [row], "--mpp", value)
        assert line == f"error: --mpp: must be a positive number of microns per pixel, got {float(value)}"
    line = tile_error(monkeypatch, capsys, folder, [row], "--mpp", 0.5, "--level", 1)
    assert line.startswith("error: --mpp excludes --level and --downsample")
    line = tile_error(monkeypatch, capsys, folder, [row], "--mpp", 0.25)  # the slide is 0.5 µm per pixel
    assert line.startswith(f"error: slide 's', file '{folder / row['image']}': mpp 0.25 is finer than")
    for value in ("0", "abc"):
        line = tile_error(monkeypatch, capsys, folder, [dict(row, mpp=value)])
        assert line.startswith(f"error: slide 's', file '{folder / 'm.csv'}': ") and f"got '{value}'" in line
        assert "manifest line 2" in line
    tifffile.imwrite(folder / "no_unit.tif", np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3),
                     photometric="rgb")
    line = tile_error(monkeypatch, capsys, folder, [dict(row, image="no_unit.tif")], "--mpp", 0.5)
    assert line.startswith(f"error: slide 's', file '{folder / 'no_unit.tif'}': pixel size unknown")
    assert "NONE (not a physical unit)" in line and "mpp column" in line
    assert not (folder / "out" / "dataset_info.json").exists()
    # The manifest's mpp gives the size the file does not state.
    tile(write_manifest(folder / "m.csv", [dict(row, image="no_unit.tif", mpp="0.5")]), folder / "out",
         "--patch-size", 16, "--mpp", 0.5)
    assert dataset.read_metadata(folder / "out")["mpp"] == 0.5


# -- 6. Resume ---------------------------------------------------------------------------------------------------------
# The settings before --mpp, --channels, --tumour-classes, --tissue-classes and --reader (on-disk names),
# and the fingerprint keys of that version's sidecars.
OLD_CONFIG = {"patch_size": 16, "stride": 16, "level": 0, "downsample": None, MIN_TUMOUR: 1, "min_tissue_ratio": 0.0,
              "tissue_polarity": "auto", "tumour_ids": None, "tissue_factor": None}
OLD_FINGERPRINT_KEYS = {"version", "config", "files", "patient_id", "channel_names"}


def test_an_mpp_dataset_resumes(physical, at_half_micron, tmp_path):
    manifest, out = at_half_micron
    before = folder_bytes(out)
    tile(manifest, out, "--patch-size", 16, "--stride", 12, "--mpp", 0.5)
    assert set(slides_of(out).values()) == {"resumed"}
    after = folder_bytes(out)
    assert [name for name in before if after[name] != before[name]] == ["tiling_report.json"]
    assert json.loads(after[".work/a.json"])["fingerprint"]["config"]["mpp"] == 0.5


def test_a_sidecar_without_the_later_options_still_resumes(small_slide):
    assert config_on_disk(TilingConfig(patch_size=16, stride=16)) == OLD_CONFIG
    for key, value in {"mpp": 0.5, "channels": ("A",), "tumour_classes": ("Tumor",), "tissue_classes": ("Tissue",),
                       "reader": "tifffile"}.items():
        assert config_on_disk(TilingConfig(patch_size=16, stride=16, **{key: value})) == {**OLD_CONFIG, key: value}
    folder, row = small_slide
    manifest = write_manifest(folder / "m.csv", [row])
    tile(manifest, folder / "out", "--patch-size", 16)
    sidecar_file = folder / "out" / ".work" / "s.json"
    sidecar = json.loads(sidecar_file.read_text())
    assert set(sidecar["fingerprint"]) == OLD_FINGERPRINT_KEYS
    # The sidecar in the form from before those options: its settings, its files (path, size, mtime), no mpp in the
    # format; at the current SIDECAR_VERSION (an older one is tiled again: tests/pipeline/test_label_independence.py).
    sources = [folder / row["image"], folder / row["mask"]]
    sidecar["fingerprint"] = {"version": SIDECAR_VERSION, "config": OLD_CONFIG, "patient_id": "", "channel_names": [],
                              "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sources]}
    sidecar["format"] = {key: value for key, value in sidecar["format"].items() if key != "mpp"}
    sidecar_file.write_text(json.dumps(sidecar))
    before = folder_bytes(folder / "out")
    tile(manifest, folder / "out", "--patch-size", 16)
    assert slides_of(folder / "out") == {"s": "resumed"}
    after = folder_bytes(folder / "out")
    assert [name for name in before if after[name] != before[name]] == ["tiling_report.json"]
