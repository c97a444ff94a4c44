"""Whole-slide prediction (`predict.py`, `gerne_jax.predict.prediction`, `inference`, `slide_outputs`).

The reference for the slide-level test is `evaluate.py`'s own path (`evaluate.evaluate_run`) on the
test split of the same tiling: the same patches, the same probabilities (float tolerance) and the
same metrics. Maps, regions and the reader pool are checked against brute-force numpy and
matplotlib's point-in-polygon.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import tifffile
from matplotlib.path import Path as PolygonPath

from gerne_jax.core.errors import InputError
from gerne_jax.evaluation import evaluate
from gerne_jax.predict import inference, prediction, run_data, slide_outputs, slide_prediction
from gerne_jax.runs import checkpoints
from tests.helpers import REPO
from tests.slide_run import PATCH, TAU, settings_for, write_manifest


# ---------------------------------------------------------------------------------------------------
# Pieces without a model
# ---------------------------------------------------------------------------------------------------
def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    results = []
    for value in inference.ordered_map(work, list(range(40)), workers=3, in_flight=4):
        results.append(value)
        with lock:  # never more than `in_flight` items started beyond those consumed
            assert len(started) <= len(results) + 4
    assert results == [i * i for i in range(40)]


def test_rebatch_regroups_chunks_into_fixed_batches():
    rng = np.random.default_rng(0)
    sizes = [0, 5, 1, 17, 0, 3, 9]
    chunks = [(rng.integers(0, 9, (n, 2, 2, 1)), {"x": np.arange(n) + 100 * k}) for k, n in enumerate(sizes)]
    batches = list(inference.rebatch(iter(chunks), 8))
    assert [len(images) for images, _ in batches] == [8, 8, 8, 8, 3]  # 35 patches
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), np.concatenate([c for c, _ in chunks]))
    np.testing.assert_array_equal(np.concatenate([f["x"] for _, f in batches]),
                                  np.concatenate([f["x"] for _, f in chunks]))
    # chunks of views (as the slide readers give): the same batches, and no batch aliases a chunk
    views = [(list(images), fields) for images, fields in chunks]
    from_views = list(inference.rebatch(iter(views), 8))
    for (expected, expected_fields), (found, found_fields) in zip(batches, from_views, strict=True):
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_array_equal(found_fields["x"], expected_fields["x"])
        assert not any(np.shares_memory(found, images) for images, _ in chunks)


def test_rebatch_with_buffers_cycles_through_that_many_arrays():
    rng = np.random.default_rng(1)
    chunks = [(rng.integers(0, 255, (n, 3, 3, 2), dtype=np.uint8), {"x": np.arange(n) + 100 * k})
              for k, n in enumerate([7, 0, 12, 4, 9, 2])]
    expected = list(inference.rebatch(iter(chunks), 5))
    found, arrays = [], []
    for images, fields in inference.rebatch(iter(chunks), 5, buffers=2):
        found.append((images.copy(), fields))  # a batch's array is refilled two batches later
        arrays.append(images)
    assert len(found) == len(expected) == 7  # 34 patches
    for (want, want_fields), (got, got_fields) in zip(expected, found, strict=True):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_fields["x"], want_fields["x"])
    assert all(np.shares_memory(arrays[k], arrays[k + 2]) for k in range(len(arrays) - 2))
    assert not np.shares_memory(arrays[0], arrays[1])
    with pytest.raises(ValueError, match="buffers"):
        next(inference.rebatch(iter(chunks), 5, buffers=0))


def test_pipelined_batches_in_a_ring_of_arrays_get_each_patch_its_own_probability():
    """`predict_batches` over `rebatch(..., buffers=PIPELINE_DEPTH)` (the predictor's loop) against the
    classifier called on one patch at a time: every patch keeps its own probability and fields through
    the refilled arrays. (On CPU the transfer copies during the call; on an accelerator it may outlive
    the call, which is why a batch's array is refilled only after its result was fetched.)"""
    from gerne_jax.core import sharding
    from gerne_jax.data import normalisation
    from gerne_jax.models import resnet
    from gerne_jax.runs import run as run_lib

    model = resnet.create_model("tiny", num_classes=2, norm="group")
    mesh = sharding.make_mesh(1)
    variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    standardise = normalisation.Standardiser([120.0, 110.0, 100.0], [50.0, 40.0, 30.0], mesh)
    classifier = inference.PatchClassifier(run_lib.RestoredModel(model, variables["params"], {}), mesh, standardise,
                                           batch_size=4)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    chunks = [(list(images[a:b]), {"index": np.arange(a, b)}) for a, b in [(0, 3), (3, 11), (11, 12), (12, 23)]]
    batches = inference.rebatch(iter(chunks), classifier.batch_size, buffers=inference.PIPELINE_DEPTH)
    found = np.full((len(images), 2), np.nan, np.float32)
    for probabilities, fields in inference.predict_batches(classifier, batches):
        found[fields["index"]] = probabilities
    one_by_one = np.concatenate([classifier(images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(found, one_by_one, atol=1e-6)


@pytest.mark.parametrize("patch, stride", [(8, 8), (8, 4), (6, 4), (8, 12)])
def test_probability_map_averages_overlapping_patches_per_pixel(patch, stride):
    rng = np.random.default_rng(patch * 10 + stride)
    shape = (45, 53)
    ys, xs = np.meshgrid(np.arange(0, shape[0] - patch + 1, stride), np.arange(0, shape[1] - patch + 1, stride),
                         indexing="ij")
    keep = rng.random(ys.size) < 0.7
    y, x = ys.ravel()[keep], xs.ravel()[keep]
    p = rng.random(y.size)
    probability_map = slide_outputs.ProbabilityMap(shape, patch, stride)
    probability_map.add(y[:5], x[:5], p[:5])
    probability_map.add(y[5:], x[5:], p[5:])
    values = probability_map.values()
    # brute force: the mean over the patches containing each pixel
    total, count = np.zeros(shape), np.zeros(shape)
    for yy, xx, pp in zip(y, x, p):
        total[yy:yy + patch, xx:xx + patch] += pp
        count[yy:yy + patch, xx:xx + patch] += 1
    cell = math.gcd(patch, stride)
    assert values.shape == (math.ceil(shape[0] / cell), math.ceil(shape[1] / cell))
    per_pixel = np.repeat(np.repeat(values, cell, axis=0), cell, axis=1)[:shape[0], :shape[1]]
    with np.errstate(invalid="ignore"):
        expected = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    np.testing.assert_allclose(per_pixel, expected, rtol=1e-6, equal_nan=True)


def inside_regions(collection: dict, points: np.ndarray) -> np.ndarray:
    """Points (x, y) inside any polygon (outer ring, not in a hole), by matplotlib's point-in-polygon."""
    inside = np.zeros(len(points), bool)
    for feature in collection["features"]:
        outer, *holes = feature["geometry"]["coordinates"]
        here = PolygonPath(np.asarray(outer)).contains_points(points)
        for hole in holes:
            here &= ~PolygonPath(np.asarray(hole)).contains_points(points)
        inside |= here
    return inside


def test_tumour_regions_are_qupath_annotations_covering_exactly_the_cells_above_threshold():
    values = np.full((14, 16), 0.2, np.float32)
    values[1:8, 1:9] = 0.9            # a ring with a hole ...
    values[3:5, 3:6] = 0.1
    values[9:12, 10:15] = 0.7         # ... a second region ...
    values[0, 15] = 0.5               # ... a single cell at the border, exactly at the threshold
    values[12:, :3] = np.nan          # no patch there
    scale = 24
    collection = slide_outputs.tumour_regions(values, 0.5, scale)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 3
    for feature in collection["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        for ring in feature["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
    ring_feature = max(collection["features"], key=lambda f: f["properties"]["measurements"]["cells"])
    assert len(ring_feature["geometry"]["coordinates"]) == 2  # outer boundary and the hole
    rows, cols = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    centres = np.stack([(cols.ravel() + 0.5) * scale, (rows.ravel() + 0.5) * scale], axis=1)
    expected = np.nan_to_num(values, nan=0).ravel() >= 0.5
    np.testing.assert_array_equal(inside_regions(collection, centres), expected)


@pytest.mark.slow
def test_whole_slide_prediction(slide_run, tmp_path):
    """One test over the trained run (its fixture costs a tiling and a training; under xdist every
    worker running a test of this module would pay it again)."""
    matches_evaluate_on_the_test_split(slide_run, tmp_path / "match")
    bad_slides_are_named_and_small_or_empty_slides_give_empty_maps(slide_run, tmp_path / "bad")
    missing_checkpoint_lists_those_the_run_has(slide_run)
    settings_come_from_the_data_and_bad_options_are_named(slide_run)


def matches_evaluate_on_the_test_split(slide_run, tmp_path):
    tmp_path.mkdir()
    run = slide_run["restored"]
    manifest = write_manifest(tmp_path / "test.csv", slide_run["test_rows"])
    out = tmp_path / "out"
    result = prediction.predict_manifest(run, manifest, out, settings_for(run), show_progress=False)
    reference = evaluate.evaluate_run(slide_run["run"], "latest", "test", taus_list=[(TAU,), (0.2,)])

    split = reference.split
    expected = {(s, int(x), int(y)): (float(p), int(label), float(r)) for s, x, y, p, label, r in zip(
        split["slide_id"], split["x"], split["y"], reference.probabilities[:, 1], split["label"],
        split["tissue_ratio"])}
    found = {}
    for row in slide_run["test_rows"]:
        table = slide_outputs.read_patch_table(slide_prediction.slide_dir(out, row["slide_id"]) / "patches.csv")
        for x, y, p, label, r in zip(table["x"], table["y"], table["probability"], table["label"],
                                     table["tissue_ratio"]):
            found[row["slide_id"], int(x), int(y)] = (float(p), int(label), float(r))
    assert found.keys() == expected.keys() and len(found) > 50
    for key, (p, label, ratio) in expected.items():
        assert found[key][1:] == (label, ratio), key
        assert found[key][0] == pytest.approx(p, abs=1e-5), key
    for key, report in reference.reports.items():
        pooled = result["pooled"][key]
        assert pooled["group_count"] == report["group_count"]
        for metric in ("worst_group_accuracy", "group_balanced_accuracy", "balanced_class_accuracy", "auroc"):
            assert pooled[metric] == pytest.approx(report[metric], abs=1e-6, nan_ok=True), metric
    document = json.loads((out / "metrics.json").read_text())
    assert document["pooled"][f"tau={TAU:g}"]["group_count"] == reference.reports[f"tau={TAU:g}"]["group_count"]

    # Every per-slide file is there; the map is the per-patch probabilities at the level-0 scale.
    slide_id = slide_run["test_rows"][0]["slide_id"]
    folder = slide_prediction.slide_dir(out, slide_id)
    for name in ("overlay.png", "regions.geojson", "summary.json", "probability.ome.tif", "detections.geojson"):
        assert (folder / name).stat().st_size > 0
    assert (out / "index.md").read_text().count("overlay.png") == len(slide_run["test_rows"])
    assert (out / "error_vs_tissue_ratio.png").stat().st_size > 0
    table = slide_outputs.read_patch_table(folder / "patches.csv")
    with tifffile.TiffFile(folder / "probability.ome.tif") as tiff:
        values = tiff.series[0].levels[0].asarray()
    np.testing.assert_array_equal(values[table["y"] // PATCH, table["x"] // PATCH], table["probability"])
    assert np.isnan(values).sum() == values.size - len(table["x"])
    detections = json.loads((folder / "detections.geojson").read_text())["features"]
    assert [f["properties"]["measurements"]["tumour_probability"] for f in detections] == pytest.approx(
        table["probability"].tolist(), abs=1e-6)
    assert [f["geometry"]["coordinates"][0][0] for f in detections] == [[x, y] for x, y in zip(table["x"], table["y"])]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["patches"] == len(table["x"])
    assert summary["max_probability"] == pytest.approx(float(table["probability"].max()))
    regions = json.loads((folder / "regions.geojson").read_text())
    rows, cols = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    centres = np.stack([(cols.ravel() + 0.5) * PATCH, (rows.ravel() + 0.5) * PATCH], axis=1)
    np.testing.assert_array_equal(inside_regions(regions, centres), np.nan_to_num(values, nan=0).ravel() >= 0.5)

    # Resume: a finished slide is skipped; a slide without its summary (killed) is predicted again.
    stamps = {row["slide_id"]: (slide_prediction.slide_dir(out, row["slide_id"]) / "patches.csv").stat().st_mtime_ns
              for row in slide_run["test_rows"]}
    again = prediction.predict_manifest(run, manifest, out, settings_for(run), show_progress=False)
    assert again["resumed"] == [row["slide_id"] for row in slide_run["test_rows"]]
    assert {row["status"] for row in again["slides"]} == {"predicted"}
    (folder / "summary.json").unlink()
    third = prediction.predict_manifest(run, manifest, out, settings_for(run), show_progress=False)
    assert [row["status"] for row in third["slides"]][0] == "predicted"
    assert (folder / "patches.csv").stat().st_mtime_ns != stamps[slide_id]
    assert third["pooled"][f"tau={TAU:g}"]["group_count"] == result["pooled"][f"tau={TAU:g}"]["group_count"]

    # Half the stride: every tiled patch again with its probability, and a map averaged per cell.
    half = prediction.predict_manifest(run, manifest, tmp_path / "half", settings_for(run, stride=PATCH // 2),
                                       show_progress=False)
    assert half["slides"][0]["patches"] > 3 * summary["patches"]
    fine = slide_outputs.read_patch_table(slide_prediction.slide_dir(tmp_path / "half", slide_id) / "patches.csv")
    fine_probability = {(int(x), int(y)): p for x, y, p in zip(fine["x"], fine["y"], fine["probability"])}
    for x, y, p in zip(table["x"], table["y"], table["probability"]):
        assert fine_probability[int(x), int(y)] == pytest.approx(p, abs=1e-5)


def bad_slides_are_named_and_small_or_empty_slides_give_empty_maps(slide_run, tmp_path):
    tmp_path.mkdir()
    run = slide_run["restored"]
    good = slide_run["test_rows"][0]
    image = tifffile.imread(good["image"])                        # (H, W, 3) uint16
    rows = [dict(good, slide_id="no_mask", mask="")]
    tifffile.imwrite(tmp_path / "one_channel.tif", image[..., 0])
    tifffile.imwrite(tmp_path / "eight_bit.tif", (image // 256).astype(np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "tiny.tif", image[:20, :24], photometric="rgb")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 40)
    tifffile.imwrite(tmp_path / "no_tissue_mask.tif", np.zeros(image.shape[:2], np.uint8))
    label_map = tifffile.imread(good["mask"])
    label_map[label_map.shape[0] // 2, label_map.shape[1] // 2] = 7  # one pixel inside the patch grid
    tifffile.imwrite(tmp_path / "label_map.tif", label_map)
    rows += [{"slide_id": "one_channel", "image": str(tmp_path / "one_channel.tif")},
             {"slide_id": "eight_bit", "image": str(tmp_path / "eight_bit.tif")},
             {"slide_id": "tiny", "image": str(tmp_path / "tiny.tif")},
             {"slide_id": "broken", "image": str(tmp_path / "broken.tif")},
             dict(good, slide_id="no_tissue", mask="", tissue_mask=str(tmp_path / "no_tissue_mask.tif")),
             dict(good, slide_id="label_map", mask=str(tmp_path / "label_map.tif"))]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"slide 'one_channel'.*1 channel\(s\) of uint16.*trained on 3 channel"):
        prediction.predict_manifest(run, manifest, out, settings_for(run), show_progress=False)
    with pytest.warns(UserWarning, match="no patch to classify"):
        result = prediction.predict_manifest(run, manifest, out, settings_for(run), skip_errors=True,
                                             show_progress=False)
    status = {row["slide_id"]: row for row in result["slides"]}
    assert result["failed"] == ["broken", "eight_bit", "label_map", "one_channel"]
    assert "uint8" in status["eight_bit"]["error"] and "uint16" in status["eight_bit"]["error"]
    # the mask's values are checked as the scan reads it: a label map stops its slide unfinished
    assert "label_map.tif" in status["label_map"]["error"] and "label map" in status["label_map"]["error"]
    assert "7" in status["label_map"]["error"]
    assert not (slide_prediction.slide_dir(out, "label_map") / slide_prediction.SUMMARY_FILE).exists()
    assert "broken.tif" in status["broken"]["error"]
    for slide_id in ("tiny", "no_tissue"):
        assert status[slide_id]["status"] == "predicted" and status[slide_id]["patches"] == 0
        with tifffile.TiffFile(slide_prediction.slide_dir(out, slide_id) / "probability.ome.tif") as tiff:
            assert np.isnan(tiff.series[0].levels[0].asarray()).all()
    # without a mask a slide is predicted, not scored
    no_mask = slide_outputs.read_patch_table(slide_prediction.slide_dir(out, "no_mask") / "patches.csv")
    assert "label" not in no_mask and len(no_mask["x"]) > 0
    assert "WGA (tau=0.1)" not in status["no_mask"]
    with open(out / "slides.csv", newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == [
            "predicted", "failed", "failed", "predicted", "failed", "predicted", "failed"]  # no_mask: first call


def missing_checkpoint_lists_those_the_run_has(slide_run):
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint of step 3 .*the run has: .*latest \(steps"):
        inference.load_run(slide_run["run"], "3")
    with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint 'best_nothing'"):
        inference.load_run(slide_run["run"], "best_nothing")


def settings_come_from_the_data_and_bad_options_are_named(slide_run):
    run = slide_run["restored"]
    tiling = run_data.data_tiling_config(run)
    assert (tiling.patch_size, tiling.stride, tiling.min_tissue_ratio) == (PATCH, PATCH, 0.0)
    assert run_data.data_tiling_config(run, stride=8, patch_size=99).patch_size == PATCH
    with pytest.raises(InputError, match="--stride"):
        run_data.data_tiling_config(run, stride=0)
    with pytest.raises(InputError, match="--threshold"):
        run_data.PredictionSettings(tiling=tiling, threshold=1.5)


@pytest.mark.slow
def test_predict_imports_no_tensorflow():
    """predict.py scans slides and runs the model without TensorFlow (about 0.5 GB less resident memory)."""
    code = ("import sys, predict; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')); "
            "assert not loaded, loaded[:5]")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]


@pytest.mark.slow
def test_command_line_answers_a_missing_run_with_one_line(tmp_path):
    completed = subprocess.run([sys.executable, "predict.py", "--workdir", str(tmp_path / "no_run"), "--manifest",
                                str(tmp_path / "slides.csv"), "--out", str(tmp_path / "out")],
                               cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    (line,) = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert "config.json" in line and "no_run" in line
