"""Evaluation and prediction restore a run's network only (`run.Run.restore_model`): its parameters and
BatchNorm statistics as saved, without the optimiser state and without building any optimiser.

The run is a GroupDRO run with train-mode BatchNorm, trained through train.py: its optimiser state holds the
group weights, which a restore built from another method's optimiser could not read.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gerne_jax.core import sharding
from gerne_jax.data import dataset
from gerne_jax.evaluation import forward
from gerne_jax.models import resnet
from gerne_jax.runs import checkpoints
from gerne_jax.runs import run as run_lib
from tests.helpers import REPO as ROOT

pytestmark = pytest.mark.slow  # trains a run through train.py (about 15 s)


@pytest.fixture(scope="module")
def group_dro_run(tiny_data, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("model_only") / "run"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:group_dro",
         f"--config.data.dir={tiny_data.path}", "--config.model.norm=shared",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return workdir


def _saved_state(workdir: pathlib.Path, step: int) -> dict:
    """The whole saved train state as orbax reads it without a target: nested dicts of numpy arrays."""
    return ocp.StandardCheckpointer().restore(workdir.absolute() / "checkpoints" / "latest" / str(step) / "state")


def test_restored_variables_are_the_saved_states(group_dro_run):
    run = run_lib.Run.open(group_dro_run)
    model, meta = run.restore_model("latest")
    steps = run.config.training.steps
    assert meta["step"] == steps
    saved = _saved_state(group_dro_run, steps)
    assert saved["opt_state"] and saved["batch_stats"]  # there is more to skip, and statistics to restore
    for name in ("params", "batch_stats"):
        restored = getattr(model, name)
        assert jax.tree.structure(restored) == jax.tree.structure(saved[name])
        jax.tree.map(np.testing.assert_array_equal, restored, saved[name])
        assert all(leaf.sharding.is_equivalent_to(sharding.replicated_sharding(run.mesh), leaf.ndim)
                   for leaf in jax.tree.leaves(restored))
    assert model.module.norm == "shared" and model.module == resnet.create_model("tiny", num_classes=2, norm="shared")


def test_restore_errors_name_the_data_and_the_checkpoints(group_dro_run):
    run = run_lib.Run.open(group_dro_run)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"does the run's config match the data in /elsewhere\? patches there are \(8, 8, 5\)"):
        run.restore_model("latest", (8, 8, 5), "/elsewhere")
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint of step 99 .*; the run has: .*latest"):
        run.restore_model(99)


_EVALUATE_AND_PREDICT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from gerne_jax.evaluation import evaluate
    from gerne_jax.predict import inference

    workdir, out = sys.argv[1:]
    evaluation = evaluate.evaluate_run(workdir, "latest", "test")
    classifier = inference.PatchClassifier.from_run(inference.load_run(workdir, "latest"), batch_size=16)
    np.savez(out, evaluated=evaluation.probabilities, predicted=classifier(evaluation.split["image"]))
    training = ("gerne_jax.train", "gerne_jax.methods")
    print(json.dumps(sorted(name for name in sys.modules
                            if name.split(".")[0] == "optax" or name.startswith(training))))
""")


def test_evaluate_and_predict_build_no_optimiser_and_match_the_saved_network(group_dro_run, tiny_data, tmp_path):
    out = tmp_path / "probabilities.npz"
    completed = subprocess.run([sys.executable, "-c", _EVALUATE_AND_PREDICT, str(group_dro_run), str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Neither optax nor any training or method module is even imported, so no optimiser can be built.
    assert json.loads(completed.stdout.splitlines()[-1]) == []
    with np.load(out) as found:
        evaluated, predicted = found["evaluated"], found["predicted"]
    np.testing.assert_array_equal(predicted, evaluated)  # one forward function for both

    # Independent: the whole saved state's network on the test patches, standardised by hand.
    saved = _saved_state(group_dro_run, json.loads((group_dro_run / "config.json").read_text())["training"]["steps"])
    metadata = dataset.read_metadata(tiny_data.path)
    images = (tiny_data.splits["test"]["image"].astype(np.float32) - np.float32(metadata["channel_mean"])) \
        / np.float32(metadata["channel_std"])
    model = resnet.create_model("tiny", num_classes=2, norm="shared")
    logits = np.asarray(model.apply({"params": saved["params"], "batch_stats": saved["batch_stats"]}, images,
                                    train=False), np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.ptp(expected[:, 1]) > 1e-3  # the network tells the patches apart: a comparison with content
    np.testing.assert_allclose(evaluated, expected, rtol=1e-5, atol=1e-6)


def test_forward_functions_are_the_model_on_standardised_images(group_dro_run, tiny_data):
    """`forward.probabilities` is the inference-mode softmax of the standardised images and
    `forward.embeddings` the input of the last layer (DFR's features)."""
    run = run_lib.Run.open(group_dro_run)
    model, _ = run.restore_model("latest")
    raw = tiny_data.splits["validation"]["image"]
    mean, std = np.float32(run.metadata["channel_mean"]), np.float32(run.metadata["channel_std"])
    images = (raw.astype(np.float32) - mean) / std
    logits = np.asarray(jax.jit(model.module.apply)(model.variables, images), np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities = forward.probabilities(model.module, model.variables, raw, mean, std)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-6)
    features = np.asarray(forward.embeddings(model.module, model.variables, raw, mean, std), np.float64)
    fc = model.params["fc"]
    np.testing.assert_allclose(logits, features @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]),
                               rtol=1e-4, atol=1e-4)
