"""The segmentation study (experiments/segmentation.py): mask crops against patches.csv and the mask files,
the pixel-wise model's output, the pixel scores against brute-force numpy, and the study end to end with
its resumption, on a few small synthetic `sections` slides."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from data_pipeline.synthetic import writing
from data_pipeline.tile_manifest import tile_manifest
from experiments import segmentation
from gerne_jax.core import config_utils
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.models.segmentation import create_segmentation_model
from gerne_jax.slides import mask_crops
from gerne_jax.slides.manifest import read_manifest
from gerne_jax.slides.scan import TilingConfig

PATCH = 16


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Five `sections` slides of about 256 pixels tiled at 16 pixels (stride 16)."""
    root = tmp_path_factory.mktemp("segmentation")
    manifest = writing.generate(root / "slides", 5, 256, seed=0, layout="sections", show_progress=False)
    tile_manifest(manifest, root / "data", TilingConfig(patch_size=PATCH, stride=PATCH), show_progress=False)
    return {"root": root, "manifest": manifest, "data": root / "data"}


def test_mask_crops_agree_with_the_patch_table_and_the_mask_files(slides):
    specs = {spec.slide_id: spec for spec in read_manifest(slides["manifest"])}
    rule = dataset.read_metadata(slides["data"])["min_tumour_pixels"]
    for split in dataset.SPLITS:
        table = dataset.read_patch_table(slides["data"], split)
        crops = mask_crops.split_mask_crops(slides["data"], slides["manifest"], split)
        assert crops.shape == (table["label"].size, PATCH, PATCH) and crops.dtype == bool
        np.testing.assert_array_equal(crops.sum(axis=(1, 2)) >= rule, table["label"] == 1)
        np.testing.assert_array_equal(np.float32(crops.sum(axis=(1, 2)) / PATCH**2), table["tumour_fraction"])
        # Independently: the level-0 mask file itself, cropped at the stored corners (tiled at level 0).
        for slide_id in np.unique(table["slide_id"]):
            mask = tifffile.imread(specs[slide_id].mask_file) != 0
            for i in np.flatnonzero(table["slide_id"] == slide_id):
                y, x = table["y"][i], table["x"][i]
                np.testing.assert_array_equal(crops[i], mask[y:y + PATCH, x:x + PATCH])
    assert any(table["label"].sum() for split in dataset.SPLITS
               for table in [dataset.read_patch_table(slides["data"], split)])


def test_segmentation_model_gives_pixel_logits_resolved_in_space():
    model = create_segmentation_model("tiny")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    logits = model.apply(variables, images)
    assert logits.shape == (2, 32, 32, 2) and logits.dtype == jnp.float32
    # The top-left quadrant replaced by other noise of the same distribution (GroupNorm's statistics stay alike).
    other = jax.random.normal(jax.random.key(10), images.shape)
    changed = images.at[:, :16, :16].set(other[:, :16, :16])
    difference = np.abs(np.asarray(model.apply(variables, changed) - logits)).mean(axis=(0, 3))
    quadrants = {"top-left": difference[:16, :16], "top-right": difference[:16, 16:],
                 "bottom-left": difference[16:, :16], "bottom-right": difference[16:, 16:]}
    assert quadrants["top-left"].mean() > 1.5 * max(q.mean() for name, q in quadrants.items() if name != "top-left")


def brute_force(truth, probability, ratio):
    """Pixel by pixel: the confusion table and each (class, tissue-ratio bin)'s errors and counts."""
    confusion, wrong, count = np.zeros((2, 2), int), np.zeros((2, 10), int), np.zeros((2, 10), int)
    for i in range(truth.shape[0]):
        for j in range(truth.shape[1]):
            if np.isnan(probability[i, j]):
                continue
            t, p = int(truth[i, j]), int(probability[i, j] >= 0.5)
            b = min(int(ratio[i, j] * 10), 9)
            confusion[t, p] += 1
            count[t, b] += 1
            wrong[t, b] += t != p
    return confusion, wrong, count


def test_pixel_scores_against_a_brute_force_count():
    rng = np.random.default_rng(0)
    truth = rng.random((23, 31)) < 0.3
    probability = np.where(rng.random(truth.shape) < 0.15, np.nan, rng.random(truth.shape))
    ratio = rng.uniform(0, 1, truth.shape)
    scores = segmentation.slide_scores(truth, probability, ratio, pixel_area=1.0)
    confusion, wrong, count = brute_force(truth, probability, ratio)
    np.testing.assert_array_equal(scores["confusion"], confusion)
    np.testing.assert_array_equal(scores["ratio_counts"], count)
    np.testing.assert_array_equal(scores["ratio_errors"], wrong)
    (tn, fp), (fn, tp) = confusion
    figures = segmentation.overlap(scores["confusion"])
    assert figures["Dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert figures["IoU"] == pytest.approx(tp / (tp + fp + fn))
    assert figures["pixel error"] == pytest.approx((fp + fn) / confusion.sum())
    # Two slides pooled: the counts add.
    both = segmentation.pooled([scores, scores])
    np.testing.assert_array_equal(both["confusion"], 2 * confusion)
    assert segmentation.overlap(both["confusion"]) == pytest.approx(figures)


def test_maps_from_patches_against_per_pixel_means():
    rng = np.random.default_rng(1)
    y, x = np.array([0, 2, 6, 2]), np.array([0, 3, 1, 3])  # overlapping 4 x 4 patches, one repeated
    values = rng.random((4, 4, 4))
    mean = segmentation.patch_mean_map((11, 9), y, x, values)
    for i in range(11):
        for j in range(9):
            covering = [values[k, i - y[k], j - x[k]] for k in range(4)
                        if y[k] <= i < y[k] + 4 and x[k] <= j < x[k] + 4]
            assert (np.isnan(mean[i, j]) if not covering else mean[i, j] == pytest.approx(np.mean(covering)))
    cells = np.array([[0.1, np.nan], [0.7, 0.2]])
    pixels = segmentation.upsampled(cells, 3, (7, 5))
    assert pixels.shape == (7, 5)
    for i in range(7):
        for j in range(5):
            expected = cells[i // 3, j // 3] if i < 6 and j < 6 else np.nan
            np.testing.assert_equal(pixels[i, j], expected)


def test_component_recall_on_a_hand_made_mask():
    truth = np.zeros((10, 12), bool)
    truth[0, 0] = True                 # 1 pixel, missed
    truth[1, 1] = True                 # touches the first only diagonally: its own component, found
    truth[3:5, 3:5] = True             # 4 pixels, 1 found
    truth[6:9, 2:7] = True             # 15 pixels, 6 found
    truth[0:2, 9:12] = True            # 6 pixels, none found
    probability = np.zeros(truth.shape)
    probability[1, 1] = probability[4, 4] = 0.9
    probability[6:8, 2:5] = 0.6        # 6 pixels of the large component
    probability[9, 9] = 0.8            # outside every component
    scores = segmentation.slide_scores(truth, probability, np.full(truth.shape, 0.5), pixel_area=4.0)
    order = np.argsort(scores["component_area"], kind="stable")
    np.testing.assert_array_equal(scores["component_area"][order], [4, 4, 16, 24, 60])
    recall = dict(zip(scores["component_area"], scores["component_recall"]))
    assert recall[16] == 0.25 and recall[24] == 0.0 and recall[60] == 0.4
    assert sorted(scores["component_recall"][scores["component_area"] == 4]) == [0.0, 1.0]
    edges = np.array([1.0, 10.0, 30.0, 100.0])
    binned = segmentation.component_recall(scores["component_area"], scores["component_recall"], edges)
    np.testing.assert_array_equal(binned["count"], [2, 2, 1])
    np.testing.assert_allclose(binned["detected"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(binned["pixel recall"], [0.5, 0.125, 0.4])
    edges = segmentation.component_edges(scores["component_area"])
    assert edges[0] <= 4 and edges[-1] > 60 and np.allclose(np.diff(np.log10(edges)), 0.5)


@pytest.fixture(scope="module")
def classifier_run(slides):
    """A tiny ERM classifier trained a few steps on the slides' DATA_DIR."""
    from configs import tiny
    from gerne_jax.methods import registry

    config = tiny.get_config("erm")
    config.data.dir = str(slides["data"])
    config.data.taus = (0.1,)
    config.method.empty_group = "drop"
    registry.train(config, slides["root"] / "classifier_seed0")
    return slides["root"] / "classifier_seed0"


def test_study_end_to_end_and_resumed(slides, classifier_run, capsys):
    root = slides["root"] / "study"
    argv = ["--data-dir", str(slides["data"]), "--manifest", str(slides["manifest"]), "--root", str(root),
            "--classifier-runs", str(classifier_run), "--seeds", "0", "--steps", "3",
            "--set", "method.empty_group=drop,training.eval_every=2,batch=2"]
    assert segmentation.main(argv) == 0
    document = json.loads((root / "results.json").read_text())
    assert (document["data_dir"], document["manifest"]) == (str(slides["data"]), str(slides["manifest"]))
    entries = {entry["method"]: entry for entry in document["entries"]}
    assert set(entries) == {"classifier classifier", "segmentation erm", "segmentation gerne"}
    test = dataset.read_patch_table(slides["data"], "test")
    for name in ("segmentation erm", "segmentation gerne"):
        entry = entries[name]
        # Stride P: the scored pixels are exactly the test patches' pixels, once each.
        assert np.sum(entry["pixels"]["confusion"]) == test["label"].size * PATCH**2
        assert np.sum(entry["pixels"]["ratio_counts"]) == test["label"].size * PATCH**2
        # Every true tumour pixel of the test patches is a true-tumour pixel scored.
        assert np.sum(entry["pixels"]["confusion"][1]) == round(float(np.sum(test["tumour_fraction"])) * PATCH**2)
        assert entry["patches"]["group_count"] == dataset.group_counts(
            test["label"], dataset.attribute_from_tissue_ratio(test["tissue_ratio"], (0.1,)), 2, 2).tolist()
        assert [h["step"] for h in entry["validation history"]] == [2, 3]
        assert entry["step"] in (2, 3)
    classifier = entries["classifier classifier"]
    assert classifier["patches"]["num_examples"] == test["label"].size
    assert np.sum(classifier["pixels"]["confusion"]) >= test["label"].size * PATCH**2  # stride P/2 covers more
    for file in ("results.md", "pixel_error_vs_tissue_ratio.png", "component_recall.png"):
        assert (root / file).is_file()
    assert "segmentation gerne" in (root / "results.md").read_text()

    runs = [root / "seg" / "erm_seed0", root / "seg" / "gerne_seed0", root / "classifiers" / classifier_run.name]
    stamps = {path: path.stat().st_mtime_ns for run in runs for path in run.glob("*.*") if path.is_file()}
    capsys.readouterr()
    assert segmentation.main(argv) == 0
    assert "finished and scored, reused" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert json.loads((root / "results.json").read_text())["entries"] == document["entries"]


def test_a_killed_run_resumes_to_the_uninterrupted_result(slides, monkeypatch):
    """GERNE killed right after its first evaluation's save (step 2 of 4), then run again: it resumes from that
    state and ends with the parameters and record of a run never interrupted."""
    from experiments import segmentation_model

    config = segmentation_model.study_config({"training.steps": 4, "training.eval_every": 2,
                                              "training.batch_per_group": 2, "method.empty_group": "drop"})
    data = segmentation_model.StudyData.load(slides["data"], slides["manifest"])
    whole, killed = slides["root"] / "whole", slides["root"] / "killed"
    assert segmentation_model.train_run(whole, "gerne", config, data)

    real_save = segmentation_model.RunState.save

    def save_then_die(state, path):
        real_save(state, path)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(segmentation_model.RunState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        segmentation_model.train_run(killed, "gerne", config, data)
    monkeypatch.undo()
    assert segmentation_model.read_record(killed)["step"] == 2
    assert segmentation_model.train_run(killed, "gerne", config, data)
    assert not segmentation_model.train_run(killed, "gerne", config, data)  # finished: not trained again
    assert segmentation_model.read_record(killed) == segmentation_model.read_record(whole)
    with np.load(whole / segmentation_model.STATE_FILE) as a, np.load(killed / segmentation_model.STATE_FILE) as b:
        for name in set(a.files) - {"record"}:  # parameters, optimiser state, best parameters
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="another config"):
        segmentation_model.train_run(killed, "gerne", config_utils.with_overrides(config, {"method.beta": 0.25}), data)
