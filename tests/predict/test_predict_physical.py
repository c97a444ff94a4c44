"""Prediction of real slides with a run tiled at a physical scale (`tile --mpp`; `gerne_jax.predict`).

The run (`mpp_run`) is trained on three synthetic slides written as OME-TIFFs of 0.5 µm per pixel and tiled
at 1 µm per pixel. Its predictions are checked against independent references: the tiler's patches and
`evaluate.evaluate_run` on its DATA_DIR; the same pixels written at twice the resolution (flat, or as level 1
of a pyramid), without a pixel size (given in the manifest instead), with their channels in another order or
among other channels, with tumour given as QuPath polygons instead of a raster mask (all of these must give
the original's patches and probabilities); and the QuPath files read back with tifffile and json against
patches.csv and the geometry of the patch grid.
"""
from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import tifffile

from data_pipeline.synthetic import writing
from data_pipeline.tile_manifest import tile_manifest
from gerne_jax.evaluation import evaluate
from gerne_jax.methods import registry
from gerne_jax.predict import inference, prediction, run_data, slide_outputs, slide_prediction
from gerne_jax.slides.manifest import SlideError
from gerne_jax.slides.scan import TilingConfig

PATCH = 16
BASE_MPP = 0.5          # microns per level-0 pixel of the slides the run was trained on
RUN_MPP = 1.0           # ... and of the pixels it was tiled at: 2 x 2 level-0 pixels each
TAU = 0.1
NAMES = writing.CHANNEL_NAMES
TUMOUR = "Tumor"
OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"
MANIFEST_COLUMNS = ("slide_id", "image", "mask", "annotations", "split", "channel_names", "mpp")


def write_ome(path, image, names, mpp, reduced=None):
    """(H, W, C) as a tiled, planar OME-TIFF naming its channels, PhysicalSizeX/Y = `mpp` µm; `reduced`, an
    image of half the size, as its pyramid level 1 (a SubIFD)."""
    metadata = {"axes": "CYX", "Channel": {"Name": list(names)}, "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    options = {"photometric": "minisblack", "tile": (64, 64), "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tiff:
        tiff.write(np.moveaxis(image, -1, 0), metadata=metadata, subifds=0 if reduced is None else 1, **options)
        if reduced is not None:
            tiff.write(np.moveaxis(reduced, -1, 0), subfiletype=1, **options)
    return path


def write_plain(path, image, mpp=None):
    """(H, W, 3) as a plain RGB TIFF (no channel names): resolution tags in pixels per cm for `mpp`, else
    unit NONE."""
    resolution = ({"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp is not None
                  else {"resolution": (1.0, 1.0), "resolutionunit": "NONE"})
    tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), **resolution)
    return path


def write_manifest(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in MANIFEST_COLUMNS} for row in rows)
    return path


@pytest.fixture(scope="module")
def mpp_run(tmp_path_factory):
    """Three synthetic slides (train / test / validation) as OME-TIFFs of BASE_MPP µm per pixel, tiled at
    RUN_MPP µm per pixel with the QuPath class TUMOUR as tumour, and a tiny ERM run on them."""
    from configs import tiny

    root = tmp_path_factory.mktemp("predict_physical")
    source = writing.generate(root / "source", 3, 512, seed=0, show_progress=False)
    with open(source, newline="") as handle:
        generated = list(csv.DictReader(handle))
    slides, rows = {}, []
    for row in generated:
        image, mask = (tifffile.imread(root / "source" / row[name]) for name in ("image", "mask"))
        slide_id = row["slide_id"]
        slides[slide_id] = {"image": image, "mask": mask, "split": row["split"]}
        rows.append({"slide_id": slide_id, "split": row["split"],
                     "image": write_ome(root / f"{slide_id}.ome.tif", image, NAMES, BASE_MPP),
                     "mask": root / f"{slide_id}_mask.tif"})
        tifffile.imwrite(rows[-1]["mask"], mask)
    manifest = write_manifest(root / "manifest.csv", rows)
    tile_manifest(manifest, root / "data", TilingConfig(patch_size=PATCH, stride=PATCH, mpp=RUN_MPP,
                                                       tumour_classes=(TUMOUR,)), show_progress=False)
    config = tiny.get_config("erm")
    config.data.dir = str(root / "data")
    config.data.taus = (TAU,)
    config.method.empty_group = "drop"
    registry.train(config, root / "run")
    return {"slides": slides, "rows": {row["slide_id"]: row for row in rows}, "run": root / "run",
            "restored": inference.load_run(root / "run", "latest")}


def settings_of(run):
    return run_data.PredictionSettings(tiling=run_data.data_tiling_config(run), taus_list=((TAU,),), batch_size=64,
                                       workers=2)


def patch_table(out, slide_id):
    return slide_outputs.read_patch_table(slide_prediction.slide_dir(out, slide_id) / "patches.csv")


def split_slide(mpp_run, split):
    (slide_id,) = [slide_id for slide_id, slide in mpp_run["slides"].items() if slide["split"] == split]
    return slide_id


@pytest.mark.slow
def test_prediction_of_real_slides_at_the_runs_mpp(mpp_run, tmp_path):
    """One test over the trained run (its fixture costs a tiling and a training, which every xdist worker
    running a test of this module would pay again)."""
    run = mpp_run["restored"]
    rows, variants = variant_slides(mpp_run, tmp_path / "slides")
    out = tmp_path / "out"
    prediction.predict_manifest(run, write_manifest(tmp_path / "manifest.csv", rows), out, settings_of(run),
                                show_progress=False)
    patches_and_probabilities_are_the_tilers_and_evaluates(mpp_run, out)
    variants_give_the_originals_patches_at_the_same_microns(mpp_run, out, variants)
    a_slide_tiled_at_another_scale_keeps_the_grid_in_microns(mpp_run, out)
    qupath_files_overlay_the_slide(mpp_run, out)
    bad_slides_are_named(mpp_run, tmp_path / "bad")
    a_slide_smaller_than_a_patch_has_an_empty_map(mpp_run, tmp_path / "small")
    settings_are_those_the_data_was_tiled_with(mpp_run)


def settings_are_those_the_data_was_tiled_with(mpp_run):
    """The run's data fixes the patch size and the mpp, and gives the tumour classes; the stride and the
    classes may be overridden."""
    tiling = run_data.data_tiling_config(mpp_run["restored"], mpp=0.25, stride=8)
    assert (tiling.patch_size, tiling.stride, tiling.mpp, tiling.tumour_classes) == (PATCH, 8, RUN_MPP, (TUMOUR,))
    assert (tiling.level, tiling.downsample, tiling.channels) == (0, None, None)
    # a run's tumour classes can be replaced (slides annotated with other class names)
    assert run_data.data_tiling_config(mpp_run["restored"], tumour_classes=("Carcinoma",)).tumour_classes == (
        "Carcinoma",)


def rectangles_mask(shape):
    """Tumour as QuPath polygons (class TUMOUR; two overlapping rectangles, one with a hole; a polygon of
    another class and a point that are not tumour) and the same tumour painted into a raster mask. Every
    corner lies on an even level-0 pixel, so each pixel read (2 x 2 level-0 pixels) is wholly in or out."""
    mask = np.zeros(shape, np.uint8)
    features = []
    for x0, y0, x1, y1 in [(40, 60, 200, 180), (150, 120, 260, 240)]:
        mask[y0:y1, x0:x1] = 1
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "annotation", "classification": {"name": TUMOUR}}})
    mask[200:400, 220:420] = 1
    mask[260:320, 280:340] = 0
    features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[220, 200], [420, 200], [420, 400], [220, 400]], [[280, 260], [340, 260], [340, 320], [280, 320]]]},
        "properties": {"objectType": "annotation", "classification": {"name": TUMOUR}}})
    features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[300, 20], [400, 20], [400, 60], [300, 60]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}})
    features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [100, 100]},
                     "properties": {"objectType": "annotation", "classification": {"name": TUMOUR}}})
    return mask, {"type": "FeatureCollection", "features": features}


def variant_slides(mpp_run, folder):
    """The three original slides and variants of the test slide: the manifest rows, and per variant the
    slide it must equal (same patches and probabilities) with its level-0 pixels per original pixel."""
    folder.mkdir()
    test_id = split_slide(mpp_run, "test")
    image, mask = mpp_run["slides"][test_id]["image"], mpp_run["slides"][test_id]["mask"]
    rows = [dict(row, split="") for row in mpp_run["rows"].values()]
    variants = {}

    def add(slide_id, equal_to, magnification=1, **row):
        rows.append({"slide_id": slide_id, **row})
        variants[slide_id] = (equal_to, magnification)

    mask_file = mpp_run["rows"][test_id]["mask"]
    # Scanned at twice the resolution: every pixel (and mask pixel) 2 x 2 times, at half the mpp.
    finer = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    tifffile.imwrite(folder / "finer_mask.tif", np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1))
    add("finer", test_id, 2, image=write_ome(folder / "finer.ome.tif", finer, NAMES, BASE_MPP / 2),
        mask=folder / "finer_mask.tif")
    # ... as a pyramid whose level 1 is the original, with the original's mask (half level 0's shape): level 0
    # is blank, so the original's probabilities can only come from level 1, the coarsest at or finer than the
    # run's mpp, resampled by 2.
    add("finer_pyramid", test_id, 2, mask=mask_file, image=write_ome(
        folder / "finer_pyramid.ome.tif", np.zeros_like(finer), NAMES, BASE_MPP / 2, reduced=image))
    # No pixel size in the file: the manifest's mpp (and channel names) say it.
    add("size_in_manifest", test_id, image=write_plain(folder / "no_size.tif", image), mask=mask_file,
        mpp=BASE_MPP, channel_names=";".join(NAMES))
    # Channels in another order, named by the OME-XML, or by the manifest (the file naming none).
    order = [2, 0, 1]
    permuted = image[..., order]
    add("permuted_ome", test_id, image=write_ome(folder / "permuted.ome.tif", permuted, [NAMES[i] for i in order],
                                                 BASE_MPP), mask=mask_file)
    add("permuted_manifest", test_id, image=write_plain(folder / "permuted.tif", permuted, BASE_MPP), mask=mask_file,
        channel_names=";".join(NAMES[i] for i in order))
    # The run's channels among others.
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 4000, (*image.shape[:2], 2), dtype=image.dtype)
    mixed = np.dstack([extra[..., 0], image[..., 2], image[..., 0], extra[..., 1], image[..., 1]])
    add("extra_channels", test_id, mask=mask_file, image=write_ome(
        folder / "extra.ome.tif", mixed, ["DAPI", NAMES[2], NAMES[0], "Ki67", NAMES[1]], BASE_MPP))
    # Tumour as QuPath polygons, against the same tumour as a raster mask.
    rectangles, annotations = rectangles_mask(mask.shape)
    tifffile.imwrite(folder / "rectangles_mask.tif", rectangles)
    (folder / "rectangles.geojson").write_text(json.dumps(annotations))
    rows.append({"slide_id": "raster_rectangles", "image": mpp_run["rows"][test_id]["image"],
                 "mask": folder / "rectangles_mask.tif"})
    add("annotated", "raster_rectangles", image=mpp_run["rows"][test_id]["image"],
        annotations=folder / "rectangles.geojson")
    # The same pixels stated at 0.3 µm: read at 1 / 0.3 level-0 pixels per pixel, a scale that is not whole.
    rows.append({"slide_id": "stated_0.3", "image": write_ome(folder / "stated.ome.tif", image, NAMES, 0.3),
                 "mask": mask_file})
    return rows, variants


def patches_and_probabilities_are_the_tilers_and_evaluates(mpp_run, out):
    """The original slides give exactly the tiler's patches (x, y at level 0, tissue ratio, label) and the
    probabilities `evaluate` computes on the DATA_DIR's patches."""
    for split in ("train", "validation", "test"):
        slide_id = split_slide(mpp_run, split)
        reference = evaluate.evaluate_run(mpp_run["run"], "latest", split, taus_list=[(TAU,)])
        expected = {(int(x), int(y)): (float(p), int(label), float(ratio)) for x, y, p, label, ratio in zip(
            reference.split["x"], reference.split["y"], reference.probabilities[:, 1], reference.split["label"],
            reference.split["tissue_ratio"])}
        assert set(reference.split["slide_id"].astype(str)) == {slide_id}
        table = patch_table(out, slide_id)
        found = {(int(x), int(y)): (float(p), int(label), float(ratio)) for x, y, p, label, ratio in zip(
            table["x"], table["y"], table["probability"], table["label"], table["tissue_ratio"])}
        assert found.keys() == expected.keys() and len(found) > 30, split
        for key, (p, label, ratio) in expected.items():
            assert found[key][1:] == (label, pytest.approx(ratio, abs=1e-6)), (split, key)
            assert found[key][0] == pytest.approx(p, abs=1e-5), (split, key)
        # at RUN_MPP / BASE_MPP = 2 level-0 pixels per pixel read, patches lie on a grid of 2 P level-0 pixels
        assert not np.any(table["x"] % (2 * PATCH)) and not np.any(table["y"] % (2 * PATCH))


def variants_give_the_originals_patches_at_the_same_microns(mpp_run, out, variants):
    """A slide scanned at twice the resolution (flat, or with the original as its pyramid level 1), one whose
    pixel size only the manifest states, one with its channels reordered or among others, and one labelled by
    QuPath polygons each give the patches of the slide they copy at the same places in microns (level-0
    coordinates x the magnification), with the same tissue ratios, labels and probabilities, bit for bit."""
    for slide_id, (original, magnification) in variants.items():
        expected, found = patch_table(out, original), patch_table(out, slide_id)
        assert len(expected["x"]) > 30, original
        for column, values in expected.items():
            if column in ("x", "y"):
                values = values * magnification
            if column != "slide_id":
                np.testing.assert_array_equal(found[column], values, err_msg=f"{slide_id} {column}")
        summary = json.loads((slide_prediction.slide_dir(out, slide_id) / "summary.json").read_text())
        assert summary["has_mask"] and summary["results"][f"tau={TAU:g}"]["group_count"]
    rectangles = patch_table(out, "annotated")
    assert 0 < rectangles["label"].sum() < len(rectangles["label"])  # the polygons label some patches, not all


def a_slide_tiled_at_another_scale_keeps_the_grid_in_microns(mpp_run, out):
    """A slide of 0.3 µm per pixel is read at RUN_MPP: its patches lie P * RUN_MPP µm apart (level-0
    coordinates rounded from a grid of P * RUN_MPP / 0.3 level-0 pixels), and cover its tissue."""
    table = patch_table(out, "stated_0.3")
    step = PATCH * RUN_MPP / 0.3
    for column in ("x", "y"):
        index = np.rint(table[column] / step)
        assert np.all(np.abs(table[column] - index * step) <= 0.5 + 1e-9), column
    height, width = mpp_run["slides"][split_slide(mpp_run, "test")]["image"].shape[:2]
    assert len(table["x"]) > 10
    assert table["x"].max() + step <= width + 0.5 and table["y"].max() + step <= height + 0.5


def qupath_files_overlay_the_slide(mpp_run, out):
    """probability.ome.tif: level 0's pixel is k = floor(P * RUN_MPP / base mpp) level-0 pixels (whole),
    PhysicalSizeX/Y = k * base mpp, ceil(H0 / k) x ceil(W0 / k) pixels, and the pixel under every patch's
    centre holds the patch's probability. detections.geojson: one square per patch, its level-0 square of
    side P * RUN_MPP / base mpp, with the patch's probability."""
    test_id = split_slide(mpp_run, "test")
    base_shape = mpp_run["slides"][test_id]["image"].shape[:2]
    cases = {test_id: (BASE_MPP, base_shape), "finer": (BASE_MPP / 2, (2 * base_shape[0], 2 * base_shape[1])),
             "stated_0.3": (0.3, base_shape), "annotated": (BASE_MPP, base_shape)}
    for slide_id, (base_mpp, shape) in cases.items():
        slide_folder = slide_prediction.slide_dir(out, slide_id)
        table = patch_table(out, slide_id)
        scale = RUN_MPP / base_mpp                     # level-0 pixels per pixel read
        side = PATCH * scale                           # a patch's side in level-0 pixels (stride = P)
        k = math.floor(side + 1e-6)
        with tifffile.TiffFile(slide_folder / "probability.ome.tif") as tiff:
            level = tiff.series[0].levels[0].asarray()
            pixels = ElementTree.fromstring(tiff.ome_metadata).find(f"{OME}Image/{OME}Pixels")
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(k * base_mpp, rel=1e-9), slide_id
        assert float(pixels.get("PhysicalSizeY")) == pytest.approx(k * base_mpp, rel=1e-9), slide_id
        assert pixels.get("PhysicalSizeXUnit") == "µm"
        assert level.shape == (-(-shape[0] // k), -(-shape[1] // k)), slide_id
        # the centre of a patch: its grid position (x, y are rounded from it) plus half a patch, times the scale
        centre_x = (np.rint(table["x"] / side) * PATCH + PATCH / 2) * scale
        centre_y = (np.rint(table["y"] / side) * PATCH + PATCH / 2) * scale
        np.testing.assert_array_equal(level[(centre_y // k).astype(int), (centre_x // k).astype(int)],
                                      table["probability"], err_msg=slide_id)
        if k == side:  # one OME pixel per patch: NaN everywhere else
            assert np.count_nonzero(~np.isnan(level)) == len(table["x"])
        features = json.loads((slide_folder / "detections.geojson").read_text())["features"]
        assert len(features) == len(table["x"])
        for feature, x, y, p in zip(features, table["x"], table["y"], table["probability"]):
            assert feature["properties"]["objectType"] == "detection"
            (ring,) = feature["geometry"]["coordinates"]
            corners = np.array(ring)
            assert corners.min(axis=0) == pytest.approx([x, y], abs=1e-3)
            assert corners.max(axis=0) == pytest.approx([x + side, y + side], abs=1e-3)
            assert ring[0] == ring[-1] and len(ring) == 5
            assert np.float32(feature["properties"]["measurements"]["tumour_probability"]) == p


def bad_slides_are_named(mpp_run, folder):
    """A slide without a pixel size, or lacking one of the run's channels, is a one-line SlideError naming
    the slide, the file and the problem."""
    folder.mkdir()
    run = mpp_run["restored"]
    test_id = split_slide(mpp_run, "test")
    image = mpp_run["slides"][test_id]["image"]
    no_size = write_plain(folder / "no_size.tif", image)
    two_channels = write_ome(folder / "two.ome.tif", image[..., [0, 2]], [NAMES[0], NAMES[2]], BASE_MPP)
    for slide_id, file, problem in [("no_size", no_size, r"pixel size unknown: .*resolution unit is NONE.*mpp"),
                                    ("two_channels", two_channels, rf"no channel\(s\) named \['{NAMES[1]}'\]")]:
        manifest = write_manifest(folder / f"{slide_id}.csv", [{"slide_id": slide_id, "image": file}])
        with pytest.raises(SlideError, match=problem) as raised:
            prediction.predict_manifest(run, manifest, folder / "out", settings_of(run), show_progress=False)
        assert (raised.value.slide_id, raised.value.file) == (slide_id, str(file))
        assert "\n" not in str(raised.value)


def a_slide_smaller_than_a_patch_has_an_empty_map(mpp_run, folder):
    """24 x 28 level-0 pixels are 12 x 14 pixels at RUN_MPP, less than a patch: no patch, a warning naming the
    scale, and an OME map of one NaN pixel of P x 2 level-0 pixels."""
    folder.mkdir()
    run = mpp_run["restored"]
    image = mpp_run["slides"][split_slide(mpp_run, "test")]["image"][200:224, 200:228]
    manifest = write_manifest(folder / "small.csv", [
        {"slide_id": "small", "image": write_ome(folder / "small.ome.tif", image, NAMES, BASE_MPP)}])
    with pytest.warns(UserWarning, match=r"'small': no patch to classify \(12 x 14 pixels at 1 µm/pixel"):
        result = prediction.predict_manifest(run, manifest, folder / "out", settings_of(run), show_progress=False)
    assert [(row["slide_id"], row["status"], row["patches"]) for row in result["slides"]] == [("small", "predicted", 0)]
    with tifffile.TiffFile(slide_prediction.slide_dir(folder / "out", "small") / "probability.ome.tif") as tiff:
        level = tiff.series[0].levels[0].asarray()
        pixels = ElementTree.fromstring(tiff.ome_metadata).find(f"{OME}Image/{OME}Pixels")
    assert level.shape == (1, 1) and np.isnan(level).all()
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(2 * PATCH * BASE_MPP)
