"""DFR: the stratified halves and balanced subsamples by counting, the refitted last layer against
scikit-learn fitted here on the same subsamples, and an ERM run's last layer refitted through train.py."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate
from gerne_jax.methods import dfr, registry
from gerne_jax.models import resnet
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.runs import run as run_lib
from tests.helpers import REPO as ROOT

BASE_STEPS = 4
C_GRID = (1.0, 0.1)
NUM_SUBSAMPLES = 3


def test_halves_are_stratified_and_subsamples_group_balanced():
    rng = np.random.default_rng(1)
    group = rng.choice(4, size=203, p=[0.55, 0.05, 0.1, 0.3])
    half_a, half_b = dfr.split_halves(group, seed=5)
    assert np.intersect1d(half_a, half_b).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([half_a, half_b])), np.arange(group.size))
    counts_a, counts_b = np.bincount(group[half_a], minlength=4), np.bincount(group[half_b], minlength=4)
    assert np.all(np.abs(counts_a - counts_b) <= 1)
    np.testing.assert_array_equal(counts_a + counts_b, np.bincount(group, minlength=4))
    other_a, _ = dfr.split_halves(group, seed=6)
    assert not np.array_equal(half_a, other_a)  # the seed decides the permutation
    np.testing.assert_array_equal(dfr.split_halves(group, seed=5)[0], half_a)

    subsamples = dfr.balanced_subsamples(half_a, group, num=4, seed=0)
    assert len(subsamples) == 4
    for subsample in subsamples:
        assert np.unique(subsample).size == subsample.size
        assert np.all(np.isin(subsample, half_a))
        np.testing.assert_array_equal(np.bincount(group[subsample], minlength=4), [counts_a.min()] * 4)
    assert not all(np.array_equal(subsamples[0], s) for s in subsamples[1:])


def test_folded_standardisation_is_the_layer_on_standardised_features():
    rng = np.random.default_rng(2)
    features = rng.normal(3.0, 2.0, size=(30, 5))
    mean, scale = features.mean(axis=0), features.std(axis=0)
    layer = dfr.LastLayer(kernel=rng.normal(size=(5, 2)), bias=rng.normal(size=2))
    np.testing.assert_allclose(dfr.fold_standardisation(layer, mean, scale).logits(features),
                               layer.logits((features - mean) / scale), rtol=1e-12, atol=1e-12)


def test_balanced_refit_drops_a_spurious_feature_that_plain_regression_relies_on():
    # Features [core, spurious]: the core one is noisy but follows the class in every group; the spurious
    # one is sharp and follows the attribute, which matches the class in the two large groups only.
    rng = np.random.default_rng(4)
    sizes = {(0, 0): 600, (0, 1): 40, (1, 0): 40, (1, 1): 600}  # (class, attribute): count
    label = np.concatenate([np.full(n, y) for (y, _), n in sizes.items()])
    attribute = np.concatenate([np.full(n, a) for (_, a), n in sizes.items()])
    features = np.stack([label + rng.normal(0, 0.6, label.size), attribute + rng.normal(0, 0.1, label.size)], 1)
    tissue_ratio = np.where(attribute == 1, 0.5, 0.05)
    fit = dfr.fit_last_layer(features, label, tissue_ratio, (0.1,), c_grid=(1.0, 0.1), num_subsamples=5,
                             split_seed=0, subsample_seed=0)

    group = 2 * label + attribute
    half_a, half_b = dfr.split_halves(group, seed=0)
    correct = np.argmax(fit.layer.logits(features[half_b]), -1) == label[half_b]
    dfr_wga = _worst_group_accuracy(correct, group[half_b])
    assert dfr_wga == pytest.approx(fit.half_b_report["worst_group_accuracy"])
    # Independent: plain (unbalanced) logistic regression on all of half A.
    plain = LogisticRegression(C=1.0).fit(features[half_a], label[half_a])
    plain_wga = _worst_group_accuracy(plain.predict(features[half_b]) == label[half_b], group[half_b])
    assert dfr_wga > plain_wga + 0.15, (dfr_wga, plain_wga)
    assert abs(fit.layer.kernel[1, 1] - fit.layer.kernel[1, 0]) < abs(fit.layer.kernel[0, 1] - fit.layer.kernel[0, 0])


def _erm_config(tiny_config):
    """Train-mode BatchNorm: GroupNorm's output vanishes on the tiny network's 1x1 maps of 8-pixel patches."""
    config = tiny_config("erm")
    config.model.norm = "shared"
    config.training.steps = BASE_STEPS
    return config


@pytest.fixture(scope="module")
def runs(tiny_config, tiny_data, tmp_path_factory):
    """An ERM base run of a few steps, then DFR on it through train.py (and the DFR run's stderr)."""
    root = tmp_path_factory.mktemp("dfr")
    base = root / "erm"
    registry.train(_erm_config(tiny_config), base)
    workdir = root / "dfr"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:dfr",
         f"--config.data.dir={tiny_data.path}", "--config.model.norm=shared",
         f"--config.method.dfr.base_workdir={base}", "--config.method.dfr.base_checkpoint=latest",
         f"--config.method.dfr.c_grid={C_GRID}", f"--config.method.dfr.num_subsamples={NUM_SUBSAMPLES}",
         "--config.method.dfr.split_seed=3", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, workdir, result.stderr


def _params(workdir, checkpoint, patch_shape, data_dir):
    model, _ = run_lib.Run.open(workdir, mesh=sharding.make_mesh()).restore_model(checkpoint, patch_shape, data_dir)
    return model


def _worst_group_accuracy(correct, group):
    return min(correct[group == g].mean() for g in np.unique(group))


@pytest.mark.slow
def test_last_layer_is_scikit_learns_regression_on_balanced_validation_features(runs, tiny_data):
    base_dir, workdir, _ = runs
    metadata = dataset.read_metadata(tiny_data.path)
    source = tiny_data.splits["validation"]
    images = (source["image"].astype(np.float32) - np.float32(metadata["channel_mean"])) / np.float32(
        metadata["channel_std"])
    base = _params(base_dir, "latest", images.shape[1:], tiny_data.path)
    variables = {"params": base.params, "batch_stats": base.batch_stats}
    _, captured = base.module.apply(variables, images, train=False, mutable=[resnet.EMBEDDING])
    features = np.asarray(captured[resnet.EMBEDDING][resnet.EMBEDDING][0], np.float64)
    # The hook is the input of the last layer: the base's logits are its affine map of the embedding.
    fc = base.params["fc"]
    np.testing.assert_allclose(np.asarray(base.module.apply(variables, images, train=False)),
                               features @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]), rtol=1e-4, atol=1e-4)

    # Independent: the groups by hand, the halves and subsamples of the (tested) helpers, scikit-learn here.
    label = source["label"]
    group = 2 * label + (source["tissue_ratio"] >= 0.1)
    half_a, half_b = dfr.split_halves(group, seed=3)
    subsamples = dfr.balanced_subsamples(half_a, group, NUM_SUBSAMPLES, seed=0)  # training.seed
    mean, std = features[half_a].mean(axis=0), features[half_a].std(axis=0)
    standardised = (features - mean) / np.where(std > 0, std, 1.0)
    decisions, wgas = {}, {}
    for c in C_GRID:
        fits = [LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear").fit(standardised[s], label[s])
                for s in subsamples]
        decisions[c] = np.mean([f.decision_function(standardised) for f in fits], axis=0)
        wgas[c] = _worst_group_accuracy((decisions[c][half_b] > 0) == label[half_b], group[half_b])
    chosen = max(C_GRID, key=lambda c: wgas[c])  # the first of the grid on a tie

    report = json.loads((workdir / dfr.REPORT_FILE).read_text())
    assert report["c"] == chosen
    assert [row["c"] for row in report["per_c"]] == list(C_GRID)
    np.testing.assert_allclose([row["half_b_worst_group_accuracy"] for row in report["per_c"]],
                               [wgas[c] for c in C_GRID])
    assert report["group_sizes"]["subsample"] == dict.fromkeys(report["group_sizes"]["subsample"],
                                                               int(np.bincount(group[half_a]).min()))

    # The DFR network computes the averaged regression on the raw images: logit difference = decision.
    state = _params(workdir, "best_wga", images.shape[1:], tiny_data.path)
    logits = np.asarray(state.module.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                                           train=False))
    assert np.ptp(decisions[chosen]) > 0.1  # the features separate something: a comparison with content
    # Tolerance: float32 features (batched and jitted in DFR, not here) and liblinear's stopping tolerance.
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decisions[chosen], rtol=1e-3, atol=2e-3)

    # Everything but the last layer is the base network's.
    flat_base = dict(jax.tree_util.tree_leaves_with_path(base.params))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        if jax.tree_util.keystr(path).startswith("['fc']"):
            continue
        np.testing.assert_array_equal(leaf, flat_base[path])
    jax.tree.map(np.testing.assert_array_equal, state.batch_stats, base.batch_stats)


@pytest.mark.slow
def test_dfr_workdir_evaluates_like_any_run_and_changes_the_predictions(runs, tiny_data, tiny_config):
    base_dir, workdir, stderr = runs
    assert "C = " in stderr and "half-B WGA" in stderr
    config = run_log.read_config(workdir)
    assert config.method.name == "dfr"
    assert run_log.is_finished(workdir)
    available = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        assert all(available.latest_step(name) == config.training.steps
                   for name in (*checkpoints.BEST_CHECKPOINTS, checkpoints.LATEST))
    finally:
        available.close()

    cache: dict = {}
    result = evaluate.evaluate_run(workdir, "best_wga", "test", split_cache=cache)
    base = evaluate.evaluate_run(base_dir, "latest", "test", split_cache=cache)
    assert 0.0 <= result.reports["tau=0.1"]["worst_group_accuracy"] <= 1.0
    assert result.checkpoint_meta["metrics"]["worst_group_accuracy"] == json.loads(
        (workdir / dfr.REPORT_FILE).read_text())["half_b"]["worst_group_accuracy"]
    assert np.any(np.argmax(result.probabilities, -1) != np.argmax(base.probabilities, -1))

    # A rerun on the finished workdir changes nothing (config.json is rewritten with the same text).
    def written(folder):
        return {p: (p.read_bytes() if p.name == run_log.CONFIG_FILE else p.stat().st_mtime_ns)
                for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}

    before = written(workdir)
    dfr_config = tiny_config("dfr")
    dfr_config.model.norm = "shared"
    for key, value in run_log.read_config(workdir).method.dfr.items():
        dfr_config.method.dfr[key] = tuple(value) if isinstance(value, list) else value
    state = registry.train(dfr_config, workdir)
    assert int(state.step) == config.training.steps
    assert written(workdir) == before


def test_bad_dfr_config_is_named(tiny_config, tmp_path):
    config = tiny_config("dfr")
    config.method.dfr.base_workdir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="method.dfr.base_workdir"):
        registry.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / run_log.CONFIG_FILE).exists()
    config.method.dfr.base_workdir = ""
    with pytest.raises(ConfigError, match="method.dfr.base_workdir"):
        registry.train(config, tmp_path / "run")


@pytest.mark.slow
def test_dfr_refuses_another_network_or_a_missing_checkpoint(runs, tiny_config, tmp_path):
    base_dir, _, _ = runs
    config = tiny_config("dfr")
    config.method.dfr.base_workdir = str(base_dir)
    with pytest.raises(ConfigError, match="model.norm"):  # the base has shared BatchNorm, this config GroupNorm
        registry.train(config, tmp_path / "run")
    config.model.norm = "shared"
    config.method.dfr.base_checkpoint = "999"
    with pytest.raises(ConfigError, match="method.dfr.base_checkpoint"):
        registry.train(config, tmp_path / "run")
    config.method.dfr.c_grid = (0.1, -1.0)
    with pytest.raises(ConfigError, match="method.dfr.c_grid"):
        registry.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
