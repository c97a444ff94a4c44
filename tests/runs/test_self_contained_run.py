"""A trained run is self-contained: its `data_spec.json` holds what prediction needs of the training DATA_DIR.

The run and slides are `tests/slide_run.py`'s (`slide_run`); the reference for a prediction made
without the DATA_DIR is the same prediction made with it, by the original run. The stored spec is
checked against the DATA_DIR's own files read with `json` alone.
"""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from gerne_jax.commands import predict as predict_command
from gerne_jax.core.errors import InputError
from gerne_jax.methods import registry
from gerne_jax.predict import inference, prediction, run_data, slide_outputs, slide_prediction
from gerne_jax.runs import run_log
from gerne_jax.slides.manifest import SlideError
from tests.slide_run import settings_for, write_manifest


# The metadata and tiling-report keys whose on-disk spelling predates the code's (the spec uses code names).
CODE_NAMES = {"min_tumor_pixels": "min_tumour_pixels"}


def all_slides_manifest(slide_run, path):
    """Every slide of the run's manifest (train, validation, test) with absolute paths and no split
    column, so that only the run's own record can tell which slide is in which split."""
    folder = slide_run["manifest"].parent
    with open(slide_run["manifest"], newline="") as handle:
        rows = [dict(row, image=str(folder / row["image"]), mask=str(folder / row["mask"]))
                for row in csv.DictReader(handle)]
    return write_manifest(path, rows), rows


def predict(workdir, manifest, out, *options):
    assert predict_command.main(["--workdir", str(workdir), "--checkpoint", "latest", "--manifest", str(manifest),
                                 "--out", str(out), *options]) == 0


def probabilities(out, slide_id):
    table = slide_outputs.read_patch_table(slide_prediction.slide_dir(out, slide_id) / "patches.csv")
    order = np.lexsort((table["x"], table["y"]))
    return table["x"][order], table["y"][order], table["probability"][order]


@pytest.mark.slow
def test_copied_run_predicts_without_its_data(slide_run, tmp_path):
    """(a) a copy of the run predicts the test slides with its DATA_DIR gone, as the original did with it;
    (c) `--split test` still picks them (the manifest has no split column: only the run knows)."""
    manifest, rows = all_slides_manifest(slide_run, tmp_path / "all_slides.csv")
    test_ids = sorted(row["slide_id"] for row in rows if row["split"] == "test")
    assert test_ids and len(test_ids) < len(rows)
    predict(slide_run["run"], manifest, tmp_path / "with_data", "--split", "test")

    copied = tmp_path / "copied_run"
    shutil.copytree(slide_run["run"], copied, ignore=shutil.ignore_patterns(".lock"))
    data, away = slide_run["data"], slide_run["data"].with_name("data_moved_away")
    data.rename(away)
    try:
        predict(copied, manifest, tmp_path / "without_data", "--split", "test")
        # The same copy as a run trained before runs stored their spec: that needs its DATA_DIR.
        (copied / run_log.DATA_SPEC_FILE).unlink()
        with pytest.raises(InputError, match=f"{data} is not a dataset"):
            inference.load_run(copied, "latest")
    finally:
        away.rename(data)

    with open(tmp_path / "without_data" / "slides.csv", newline="") as handle:
        assert sorted(row["slide_id"] for row in csv.DictReader(handle)) == test_ids
    for slide_id in test_ids:
        x, y, found = probabilities(tmp_path / "without_data", slide_id)
        x_ref, y_ref, expected = probabilities(tmp_path / "with_data", slide_id)
        assert len(found) > 50
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_stored_spec_is_the_data_dirs_metadata_and_tiling_report(slide_run, tmp_path):
    """(b) the spec holds the DATA_DIR's metadata.json, tiling settings and slide splits unchanged; a run
    trained before runs stored a spec (none in its workdir) reads the same values from its DATA_DIR."""
    stored = json.loads((slide_run["run"] / run_log.DATA_SPEC_FILE).read_text())
    metadata = json.loads((slide_run["data"] / "metadata.json").read_text())
    report = json.loads((slide_run["data"] / "tiling_report.json").read_text())
    assert stored["metadata"] == {CODE_NAMES.get(key, key): value for key, value in metadata.items()}
    for key in ("patch_size", "channel_names", "source_dtype", "level", "level_downsample", "stride",
                "min_tumour_pixels", "min_tissue_ratio", "channel_mean", "channel_std"):
        assert key in stored["metadata"], key
    assert stored["tiling"] == {CODE_NAMES.get(key, key): value for key, value in report["config"].items()}
    assert stored["slide_splits"] == {slide_id: entry["split"] for slide_id, entry in report["slides"].items()}
    assert stored["data_dir"] == str(slide_run["data"].absolute())

    run = slide_run["restored"]
    assert run.data_spec.source == str(slide_run["run"] / run_log.DATA_SPEC_FILE)
    old = tmp_path / "old_run"
    shutil.copytree(slide_run["run"], old, ignore=shutil.ignore_patterns(".lock", run_log.DATA_SPEC_FILE))
    old_run = inference.load_run(old, "latest")
    assert old_run.data_spec.source == str(slide_run["data"])
    assert old_run.metadata == run.metadata and old_run.data_spec.slide_splits == run.data_spec.slide_splits
    assert run_data.data_tiling_config(old_run) == run_data.data_tiling_config(run)


@pytest.mark.slow
def test_slide_channels_are_found_by_name(slide_run, tmp_path):
    """A slide is read in the run's channel order by name (tests/predict/test_predict_physical.py reorders
    them); one without a channel of the run's is refused, naming it."""
    good = slide_run["test_rows"][0]
    names = good["channel_names"].split(";")
    manifest = write_manifest(tmp_path / "renamed.csv", [dict(good, channel_names=";".join([*names[:2], "DAPI"]))])
    run = slide_run["restored"]
    with pytest.raises(SlideError, match=r"no channel\(s\) named \['SHG'\]; the slide's channels are "
                                         r"\['CARS', 'TPEF', 'DAPI'\]"):
        prediction.predict_manifest(run, manifest, tmp_path / "out", settings_for(run), show_progress=False)


def test_resumed_run_keeps_its_data_spec_and_refuses_changed_data(tiny_data, tiny_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data.path, data)
    config = tiny_config("erm")
    config.data.dir = str(data)
    config.training.steps = 2
    workdir = tmp_path / "run"
    registry.train(config, workdir)
    path = workdir / run_log.DATA_SPEC_FILE
    written, stamp = path.read_bytes(), path.stat().st_mtime_ns
    assert run_log.read_data_spec(workdir).metadata["channel_names"] == ["CARS", "TPEF", "SHG"]
    assert run_log.read_data_spec(workdir).tiling is None  # a DATA_DIR without tiling report

    config.training.steps = 3  # resumed on unchanged data: the spec is kept as it was
    registry.train(config, workdir)
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stamp

    metadata = json.loads((data / "metadata.json").read_text())
    metadata["channel_mean"][0] += 1.0
    (data / "metadata.json").write_text(json.dumps(metadata))
    config.training.steps = 4
    with pytest.raises(InputError, match=rf"{path}.*metadata\.channel_mean") as error:
        registry.train(config, workdir)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == written
