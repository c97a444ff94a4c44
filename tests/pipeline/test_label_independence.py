"""Which patches a slide yields depends on its tissue alone, never on its tumour mask (issue #29; docs/design.md §2).

A slide tiled with its tumour mask and with an all-zero mask of the same shape must list the same patches in
patches.csv (x, y, tissue ratio); only label and tumour fraction differ. Both are checked against a numpy loop
over the tissue alone (the detected tissue, `SlideScan.detected` upsampled by its factor, or the given tissue
mask) and over the mask files. The hand-made slide has a tumour blob outside the tissue: under the former rule
(tissue | tumour) it yielded a patch, which the test asserts before asserting that it yields none. Prediction
of one slide with its mask, with that blob added to it and without a mask classifies the same patches. Work
of the former SIDECAR_VERSION (1) is redone, not resumed, by the tiler and by prediction.
"""
from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
import tifffile

from data_pipeline.synthetic import writing
from data_pipeline.tile_manifest import tile_manifest
from data_pipeline.tiling import slide_paths
from gerne_jax.data import dataset
from gerne_jax.predict import prediction, slide_outputs, slide_prediction
from gerne_jax.slides.manifest import SlideSpec, read_manifest
from gerne_jax.slides.scan import SIDECAR_VERSION, SlideScan, TilingConfig, open_reader
from tests.slide_run import PATCH, settings_for
from tests.slide_run import write_manifest as write_predict_manifest

pytestmark = pytest.mark.filterwarnings("ignore:split '(train|validation|test)' has no patches")

# The hand-made slide (96 x 128, 3 channels): bright tissue in columns < 64 on a dark background; tumour in a
# rectangle across the tissue's edge and in a blob far out in the background.
SHAPE, TISSUE_COLUMNS = (96, 128), 64
TUMOUR_BOXES = ((16, 48, 40, 80), (72, 76, 104, 108))  # (top, bottom, left, right)
BLOB = TUMOUR_BOXES[1]
# The given tissue mask, unlike the bright region, so that a ratio from detection would not match it.
GIVEN_TISSUE_BOX = (8, 96, 0, 56)
HAND_CONFIG = TilingConfig(patch_size=16, stride=8, tissue_factor=4)
Patches = dict[tuple[str, int, int], tuple[int, np.float32, np.float32]]


# -- The truth: numpy loops over full arrays ---------------------------------------------------------------------------
def box_mask(boxes) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    for top, bottom, left, right in boxes:
        mask[top:bottom, left:right] = True
    return mask


def tissue_alone(spec: SlideSpec, config: TilingConfig) -> np.ndarray:
    """The slide's tissue at full resolution: its tissue mask, else the scan's detected tissue upsampled by the
    scan's factor (pixel (i, j) = detected[i // f, j // f])."""
    if spec.tissue_mask_file is not None:
        return tifffile.imread(spec.tissue_mask_file) != 0
    with open_reader(spec, config) as reader:
        scan = SlideScan(reader, config)
        height, width = reader.shape
        return np.repeat(np.repeat(scan.detected, scan.factor, 0), scan.factor, 1)[:height, :width]


def kept_patches(slide_id: str, tissue: np.ndarray, tumour: np.ndarray, config: TilingConfig) -> Patches:
    """(slide, x, y) -> (label, tumour fraction, tissue ratio) of every patch with tissue ratio > 0."""
    P, S = config.patch_size, config.stride
    patches = {}
    for y in range(0, tissue.shape[0] - P + 1, S):
        for x in range(0, tissue.shape[1] - P + 1, S):
            tumour_pixels, tissue_pixels = int(tumour[y:y + P, x:x + P].sum()), int(tissue[y:y + P, x:x + P].sum())
            if tissue_pixels:
                patches[slide_id, x, y] = (int(tumour_pixels >= 1), np.float32(tumour_pixels / P**2),
                                           np.float32(tissue_pixels / P**2))
    return patches


def tiled_patches(data_dir: pathlib.Path) -> Patches:
    """patches.csv as (slide, x, y) -> (label, tumour fraction, tissue ratio)."""
    table = dataset.read_patch_table(data_dir)
    rows = zip(table["slide_id"], table["x"], table["y"], table["label"], table["tumour_fraction"],
               table["tissue_ratio"], strict=True)
    return {(str(s), int(x), int(y)): (int(label), fraction, ratio) for s, x, y, label, fraction, ratio in rows}


def tile(manifest: pathlib.Path, out: pathlib.Path, config: TilingConfig) -> dict[str, str]:
    """Tiles `manifest` into `out`; slide id -> status ("tiled" or "resumed")."""
    report = tile_manifest(manifest, out, config, show_progress=False)
    return {slide_id: entry["status"] for slide_id, entry in report["slides"].items()}


def with_masks(manifest: pathlib.Path, masks: dict[str, np.ndarray], name: str) -> pathlib.Path:
    """A copy of `manifest` (beside it) whose slides have the tumour masks `masks` (slide id -> mask), written as
    `<slide>_<name>.tif`."""
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["mask"] = f"{row['slide_id']}_{name}.tif"
        tifffile.imwrite(manifest.parent / row["mask"], masks[row["slide_id"]].astype(np.uint8))
    path = manifest.parent / f"{name}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def assert_same_patches(found: Patches, expected: Patches) -> None:
    assert found.keys() == expected.keys()
    for key, (label, fraction, ratio) in expected.items():
        assert found[key] == (label, fraction, ratio), key


# -- Synthetic slides --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["classic", "sections"])
def test_a_synthetic_slide_yields_the_same_patches_with_its_mask_and_with_an_empty_one(tmp_path, layout):
    manifest = writing.generate(tmp_path / "slides", 3, 512, seed=3, show_progress=False, layout=layout)
    config = TilingConfig(patch_size=32, stride=24, tissue_factor=4)
    specs = read_manifest(manifest)
    masks = {spec.slide_id: tifffile.imread(spec.mask_file) != 0 for spec in specs}
    empty = with_masks(manifest, {slide_id: np.zeros_like(mask) for slide_id, mask in masks.items()}, "empty")
    tile(manifest, tmp_path / "with_mask", config)
    tile(empty, tmp_path / "empty_mask", config)

    expected, expected_empty = {}, {}
    for spec in specs:
        tissue = tissue_alone(spec, config)
        expected |= kept_patches(spec.slide_id, tissue, masks[spec.slide_id], config)
        expected_empty |= kept_patches(spec.slide_id, tissue, np.zeros_like(tissue), config)
    labels = [label for label, _, _ in expected.values()]
    assert 0 < sum(labels) < len(labels)  # both classes: the masks matter to the labels
    assert_same_patches(tiled_patches(tmp_path / "with_mask"), expected)
    assert_same_patches(tiled_patches(tmp_path / "empty_mask"), expected_empty)


# -- A hand-made slide with tumour outside the tissue ------------------------------------------------------------------
def write_hand_made(folder: pathlib.Path, given_tissue: bool) -> pathlib.Path:
    """The hand-made slide and its manifest (with the tissue mask GIVEN_TISSUE_BOX if `given_tissue`)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 30, (*SHAPE, 3))
    image[:, :TISSUE_COLUMNS] += 170
    tifffile.imwrite(folder / "hand.tif", image.astype(np.uint8), photometric="rgb")
    tifffile.imwrite(folder / "hand_tumour.tif", box_mask(TUMOUR_BOXES).astype(np.uint8))
    row = {"slide_id": "hand", "image": "hand.tif", "mask": "hand_tumour.tif", "split": "train"}
    if given_tissue:
        tifffile.imwrite(folder / "hand_tissue.tif", box_mask([GIVEN_TISSUE_BOX]).astype(np.uint8))
        row["tissue_mask"] = "hand_tissue.tif"
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    return path


@pytest.mark.parametrize("given_tissue", [False, True], ids=["detected", "tissue_mask"])
def test_tumour_outside_the_tissue_yields_no_patch(tmp_path, given_tissue):
    manifest = write_hand_made(tmp_path, given_tissue)
    [spec] = read_manifest(manifest)
    tissue, tumour = tissue_alone(spec, HAND_CONFIG), box_mask(TUMOUR_BOXES)
    if not given_tissue:  # detection found the bright columns (to the thumbnail's 4-pixel blocks)
        assert tissue[:, 4:TISSUE_COLUMNS - 4].all() and not tissue[:, TISSUE_COLUMNS + 4:].any()
    expected = kept_patches("hand", tissue, tumour, HAND_CONFIG)
    # The patches over the blob: the former rule, tissue | tumour, kept them (labelled tumour), this one does not.
    former = kept_patches("hand", tissue | tumour, tumour, HAND_CONFIG)
    top, bottom, left, right = BLOB
    blob_patches = {("hand", x, y) for x in range(0, SHAPE[1] - 15, 8) for y in range(0, SHAPE[0] - 15, 8)
                    if x < right and left < x + 16 and y < bottom and top < y + 16}
    assert len(blob_patches) == 4 and blob_patches <= former.keys() and not blob_patches & expected.keys()
    # A tumour patch's tissue ratio may now be below its tumour fraction (tumour across the tissue's edge).
    assert any(fraction > ratio for _, fraction, ratio in expected.values())

    empty = with_masks(manifest, {"hand": np.zeros(SHAPE, bool)}, "empty")
    tile(manifest, tmp_path / "with_mask", HAND_CONFIG)
    tile(empty, tmp_path / "empty_mask", HAND_CONFIG)
    assert_same_patches(tiled_patches(tmp_path / "with_mask"), expected)
    assert_same_patches(tiled_patches(tmp_path / "empty_mask"),
                        kept_patches("hand", tissue, np.zeros(SHAPE, bool), HAND_CONFIG))


def test_a_sidecar_of_the_former_version_is_tiled_again(tmp_path):
    manifest = write_hand_made(tmp_path, given_tissue=False)
    out = tmp_path / "out"
    assert tile(manifest, out, HAND_CONFIG) == {"hand": "tiled"}
    assert tile(manifest, out, HAND_CONFIG) == {"hand": "resumed"}
    # The sidecar as the former version left it: version 1, and the blob's patches among its rows.
    sidecar_file = slide_paths(out, "hand")["sidecar"]
    sidecar = json.loads(sidecar_file.read_text())
    assert sidecar["fingerprint"]["version"] == SIDECAR_VERSION > 1
    sidecar["fingerprint"]["version"] = 1
    sidecar["rows"].append(dict(sidecar["rows"][-1], x=104, y=64, label=1))
    sidecar_file.write_text(json.dumps(sidecar))
    assert tile(manifest, out, HAND_CONFIG) == {"hand": "tiled"}
    assert json.loads(sidecar_file.read_text())["fingerprint"]["version"] == SIDECAR_VERSION
    [spec] = read_manifest(manifest)
    assert_same_patches(tiled_patches(out), kept_patches("hand", tissue_alone(spec, HAND_CONFIG),
                                                         box_mask(TUMOUR_BOXES), HAND_CONFIG))


# -- Prediction --------------------------------------------------------------------------------------------------------
def blob_outside(tissue: np.ndarray, size: int = 4) -> tuple[int, int]:
    """Top-left of a size x size blob at least a patch away from any tissue pixel (the first in raster order)."""
    margin = PATCH + size
    for y in range(margin, tissue.shape[0] - margin, size):
        for x in range(margin, tissue.shape[1] - margin, size):
            if not tissue[y - PATCH:y + size + PATCH, x - PATCH:x + size + PATCH].any():
                return y, x
    raise AssertionError("the slide has no background a patch away from its tissue")


@pytest.mark.slow
def test_prediction_with_and_without_a_mask_classifies_the_same_patches(slide_run, tmp_path):
    run = slide_run["restored"]
    settings = settings_for(run)
    row = slide_run["test_rows"][0]
    [spec] = read_manifest(write_predict_manifest(tmp_path / "one.csv", [row]))
    mask = tifffile.imread(row["mask"])
    y, x = blob_outside(tissue_alone(spec, settings.tiling))
    blob_mask = mask.copy()
    blob_mask[y:y + 4, x:x + 4] = 1
    tifffile.imwrite(tmp_path / "blob.tif", blob_mask)
    slides = {"with_mask": row, "with_blob": dict(row, mask=str(tmp_path / "blob.tif")),
              "without_mask": dict(row, mask="")}
    manifest = write_predict_manifest(tmp_path / "manifest.csv",
                                      [dict(r, slide_id=slide_id) for slide_id, r in slides.items()])
    out = tmp_path / "out"
    prediction.predict_manifest(run, manifest, out, settings, show_progress=False)
    tables = {slide_id: slide_outputs.read_patch_table(slide_prediction.slide_dir(out, slide_id) / "patches.csv")
              for slide_id in slides}
    reference = tables["with_mask"]
    assert len(reference["x"]) > 50 and 0 < reference["label"].sum() < len(reference["label"])
    for slide_id in ("with_blob", "without_mask"):
        for column in ("x", "y", "tissue_ratio"):
            np.testing.assert_array_equal(tables[slide_id][column], reference[column], err_msg=slide_id)
        np.testing.assert_allclose(tables[slide_id]["probability"], reference["probability"], atol=1e-6)
    np.testing.assert_array_equal(tables["with_blob"]["label"], reference["label"])  # the blob is in no patch
    assert "label" not in tables["without_mask"]

    # A slide predicted under the former version is predicted again; the others resume.
    summary_file = slide_prediction.slide_dir(out, "with_blob") / slide_prediction.SUMMARY_FILE
    summary = json.loads(summary_file.read_text())
    summary["fingerprint"]["slide"]["version"] = 1
    summary_file.write_text(json.dumps(summary))
    again = prediction.predict_manifest(run, manifest, out, settings, show_progress=False)
    assert again["resumed"] == ["with_mask", "without_mask"]
    assert json.loads(summary_file.read_text())["fingerprint"]["slide"]["version"] == SIDECAR_VERSION
