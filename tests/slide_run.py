"""Three synthetic slides tiled into a DATA_DIR and a tiny ERM run on them: the fixture `slide_run` of the
prediction tests (tests/predict/test_predict.py, tests/runs/test_self_contained_run.py), with their manifest
writer and prediction settings."""
from __future__ import annotations

import csv
import pathlib

import pytest

from data_pipeline.synthetic import writing
from data_pipeline.tile_manifest import tile_manifest
from gerne_jax.methods import registry
from gerne_jax.predict import inference, run_data
from gerne_jax.slides.scan import TilingConfig

PATCH = 32
TAU = 0.1


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """Three synthetic slides (train / test / validation), tiled at 32 px, and a tiny ERM run on them."""
    from configs import tiny

    root = tmp_path_factory.mktemp("predict")
    manifest = writing.generate(root / "slides", 3, 384, seed=0, show_progress=False)
    tile_manifest(manifest, root / "data", TilingConfig(patch_size=PATCH, stride=PATCH), show_progress=False)
    config = tiny.get_config("erm")
    config.data.dir = str(root / "data")
    config.data.taus = (TAU,)
    config.method.empty_group = "drop"
    registry.train(config, root / "run")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_rows = [dict(row, image=str(root / "slides" / row["image"]), mask=str(root / "slides" / row["mask"]))
                 for row in rows if row["split"] == "test"]
    return {"root": root, "manifest": manifest, "test_rows": test_rows, "run": root / "run",
            "data": root / "data", "restored": inference.load_run(root / "run", "latest")}


def write_manifest(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    columns = [c for c in ("slide_id", "image", "mask", "tissue_mask", "channel_names") if any(c in r for r in rows)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in columns} for row in rows)
    return path


def settings_for(run: inference.RestoredRun, **overrides) -> run_data.PredictionSettings:
    tiling = run_data.data_tiling_config(run, stride=overrides.pop("stride", None))
    return run_data.PredictionSettings(tiling=tiling, taus_list=((TAU,), (0.2,)), batch_size=64, workers=2,
                                         **overrides)
