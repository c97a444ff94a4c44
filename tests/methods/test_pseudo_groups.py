"""GERNE with unknown attributes: the pseudo attribute against a brute-force argsort per class, precision and
recall against scikit-learn, the scoring run's probabilities against the checkpoint applied by hand, the
batch plan of a train.py run against a numpy count of the pseudo-groups, and the config errors.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score

from gerne_jax.core import sharding
from gerne_jax.core.errors import ConfigError, InputError
from gerne_jax.data import dataset, input_pipeline
from gerne_jax.methods import pseudo_groups, reference_run, registry
from gerne_jax.runs import run as run_lib
from gerne_jax.runs import run_log
from gerne_jax.train import trainer
from tests.helpers import REPO as ROOT

SCORING_STEPS = 4
FRACTION = 0.3


def brute_force_minority(p_true: np.ndarray, label: np.ndarray, fraction: float) -> np.ndarray:
    """Per class, the round(t * n_y) (Python's round: half to even) examples first in (p_true, index) order."""
    minority = np.zeros(label.size, bool)
    for y in np.unique(label):
        members = np.flatnonzero(label == y)
        order = members[np.lexsort((members, p_true[members]))]  # last key first: p_true, then index
        minority[order[:round(fraction * members.size)]] = True
    return minority


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.9])
def test_pseudo_minority_is_each_class_lowest_true_class_probabilities(fraction):
    rng = np.random.default_rng(int(fraction * 100))
    num_classes = 3
    label = rng.integers(0, num_classes, size=202)
    # Few distinct values: many ties, which must go to the lower index.
    p_true = rng.integers(0, 7, size=label.size) / 7.0
    attribute = pseudo_groups.pseudo_attribute(p_true, label, fraction, num_classes)
    assert attribute.dtype == np.int32 and set(np.unique(attribute)) <= {0, 1}
    expected = brute_force_minority(p_true, label, fraction)
    np.testing.assert_array_equal(attribute == pseudo_groups.MINORITY, expected)
    for y in range(num_classes):
        assert np.sum(attribute[label == y]) == round(fraction * np.sum(label == y))
    # Half-to-even rounding of t * n_y: 0.25 * 10 = 2.5 -> 2, 0.25 * 14 = 3.5 -> 4.
    np.testing.assert_array_equal(pseudo_groups.minority_sizes(np.repeat([0, 1], [10, 14]), 0.25, 2), [2, 4])


def test_true_class_probability_picks_each_examples_own_class():
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], np.float32)
    np.testing.assert_array_equal(pseudo_groups.true_class_probability(probabilities, np.array([1, 1, 0])),
                                  np.float32([0.1, 0.7, 0.6]))


def test_precision_and_recall_match_scikit_learn():
    rng = np.random.default_rng(5)
    size = 400
    label = rng.integers(0, 2, size=size)
    # Three true bins; each class has its own majority bin (2 for class 0, 0 for class 1).
    true_attribute = np.where(label == 0, rng.choice(3, size, p=[0.2, 0.1, 0.7]),
                              rng.choice(3, size, p=[0.6, 0.3, 0.1]))
    probabilities = rng.dirichlet([1.0, 1.0], size=size).astype(np.float32)
    bins = ("low", "mid", "high")
    source = {"scoring_workdir": "runs/scoring", "scoring_checkpoint": "best_bca", "scoring_step": 7}
    groups = pseudo_groups.make(probabilities, label, true_attribute, fraction=0.35, true_bin_names=bins,
                                source=source)

    predicted = brute_force_minority(probabilities[np.arange(size), label], label, 0.35)
    np.testing.assert_array_equal(groups.attribute == 1, predicted)
    majority = {0: 2, 1: 0}
    actual = true_attribute != np.vectorize(majority.get)(label)
    report = groups.report
    for y, name in enumerate(dataset.CLASS_NAMES):
        row, members = report["per_class"][name], label == y
        assert row["precision"] == pytest.approx(precision_score(actual[members], predicted[members]))
        assert row["recall"] == pytest.approx(recall_score(actual[members], predicted[members]))
        assert (row["examples"], row["pseudo_minority"], row["true_minority"]) == (
            members.sum(), predicted[members].sum(), actual[members].sum())
    assert report["overall"]["precision"] == pytest.approx(precision_score(actual, predicted))
    assert report["overall"]["recall"] == pytest.approx(recall_score(actual, predicted))
    assert report["pseudo_minority_share_by_true_group"]["(tumour, mid)"] == pytest.approx(
        predicted[(label == 1) & (true_attribute == 1)].mean())
    text = groups.describe()
    assert "runs/scoring best_bca (step 7)" in text
    assert "non_tumour outside high" in text and "tumour outside low" in text
    assert re.search(rf"^all\s+{size}\s+{predicted.sum()}\s+{actual.sum()}\s", text, re.M)


def test_fraction_leaving_a_pseudo_group_empty_is_named():
    label = np.repeat([0, 1], [3, 40])
    probabilities = np.full((label.size, 2), 0.5, np.float32)
    with pytest.raises(ConfigError, match=r"method.pseudo_groups.fraction = 0.1 .* class non_tumour"):
        pseudo_groups.make(probabilities, label, np.zeros(label.size, np.int32), fraction=0.1,
                           true_bin_names=("r < 0.1", "r >= 0.1"), source={})


@pytest.fixture(scope="module")
def scoring_run(tiny_config, tmp_path_factory):
    """The scoring ERM run on the tiny data: ERM's learning rate / 10 and weight decay x 2, a few steps
    (BatchNorm: GroupNorm's output vanishes on 8-pixel patches)."""
    config = tiny_config("erm")
    config.model.norm = "shared"
    config.optimizer.learning_rate /= 10
    config.optimizer.weight_decay *= 2
    config.training.steps = SCORING_STEPS
    workdir = tmp_path_factory.mktemp("pseudo") / "scoring"
    registry.train(config, workdir)
    return workdir, config


def _pseudo_config(tiny_config, scoring_workdir, method="gerne"):
    config = tiny_config(method)
    config.model.norm = "shared"
    config.method.pseudo_groups.scoring_workdir = str(scoring_workdir)
    config.method.pseudo_groups.fraction = FRACTION
    return config


@pytest.mark.slow
def test_pseudo_groups_of_the_scoring_runs_best_bca_checkpoint(scoring_run, tiny_config, tiny_data):
    workdir, scoring_config = scoring_run
    config = _pseudo_config(tiny_config, workdir)
    train = input_pipeline.load_split(tiny_data.path, "train")
    metadata = dataset.read_metadata(tiny_data.path)
    mesh = sharding.make_mesh()
    true_attribute = dataset.attribute_from_tissue_ratio(train["tissue_ratio"], config.data.taus)
    groups = pseudo_groups.from_scoring_run(config, train, metadata, mesh, true_attribute)

    # Independent: the best_bca checkpoint applied to the source arrays, normalised by hand.
    model, meta = run_lib.Run.open(workdir, mesh=mesh).restore_model("best_bca", train["image"].shape[1:],
                                                                     tiny_data.path)
    source = tiny_data.splits["train"]
    images = (source["image"].astype(np.float32) - np.float32(metadata["channel_mean"])) / np.float32(
        metadata["channel_std"])
    logits = model.module.apply({"params": model.params, "batch_stats": model.batch_stats}, images, train=False)
    expected_probabilities = np.asarray(jax.nn.softmax(jax.device_get(logits), axis=-1))
    cache = reference_run.cache_file(workdir, "best_bca", meta["step"])
    with np.load(cache) as stored:
        cached = stored["probabilities"]
    np.testing.assert_allclose(cached, expected_probabilities, atol=1e-5)
    assert groups.report["scoring_step"] == meta["step"]
    # The pseudo attribute is the brute-force one of those probabilities; a second call reads the cache.
    expected = brute_force_minority(cached[np.arange(cached.shape[0]), source["label"]], source["label"], FRACTION)
    np.testing.assert_array_equal(groups.attribute == 1, expected)
    np.testing.assert_array_equal(
        pseudo_groups.from_scoring_run(config, train, metadata, mesh, true_attribute).attribute, groups.attribute)

    # Resampling (c = 1, beta = 0) on the pseudo-groups: each class's less-biased batch is half minority.
    resample = _pseudo_config(tiny_config, workdir, "resample")
    method = registry.create(resample)
    method.prepare(train, true_attribute, trainer.Context(resample, metadata, mesh))
    np.testing.assert_array_equal(method.attribute, groups.attribute)
    np.testing.assert_array_equal(method.plan.less_biased_counts, np.full((2, 2), resample.training.batch_per_group))
    assert method.plan.bin_names == pseudo_groups.BIN_NAMES

    # A cache of another training split is refused, naming the file.
    with np.load(cache) as stored:
        other = dict(stored)
    other["label"] = 1 - other["label"]
    with open(cache, "wb") as file:
        np.savez(file, **other)
    with pytest.raises(InputError, match=re.escape(cache.name)):
        pseudo_groups.from_scoring_run(config, train, metadata, mesh, true_attribute)
    cache.unlink()


@pytest.mark.slow
def test_gerne_on_pseudo_groups_trains_end_to_end_through_train_py(scoring_run, tiny_data, tmp_path):
    scoring, _ = scoring_run
    workdir = tmp_path / "gerne_pseudo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:gerne",
         f"--config.data.dir={tiny_data.path}", "--config.model.norm=shared",
         f"--config.method.pseudo_groups.scoring_workdir={scoring}",
         f"--config.method.pseudo_groups.fraction={FRACTION}", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # Independent count of the pseudo-groups from the cached scoring probabilities.
    step = reference_run.checkpoint_step(scoring, "best_bca", "key")
    with np.load(reference_run.cache_file(scoring, "best_bca", step)) as stored:
        probabilities = stored["probabilities"]
    source = tiny_data.splits["train"]
    label = source["label"]
    minority = brute_force_minority(probabilities[np.arange(label.size), label], label, FRACTION)
    for y, name in enumerate(dataset.CLASS_NAMES):
        counts = [np.sum(~minority & (label == y)), np.sum(minority & (label == y))]
        # The batch plan's alpha table row: "alpha (examples)" per pseudo-group.
        row = re.search(rf"^{name}\s+\S+ \((\d+)\)\s+\S+ \((\d+)\)\s*$", result.stderr, re.M)
        assert row is not None, result.stderr[-3000:]
        assert [int(row.group(1)), int(row.group(2))] == counts
    assert "pseudo-majority" in result.stderr and "precision" in result.stderr

    # pseudo_groups.json: precision and recall against the true minority (the smaller bin at tau per class).
    report = json.loads((workdir / pseudo_groups.REPORT_FILE).read_text())
    true_attribute = dataset.attribute_from_tissue_ratio(source["tissue_ratio"], (0.1,))
    majority = np.array([np.argmax(np.bincount(true_attribute[label == y], minlength=2)) for y in (0, 1)])
    actual = true_attribute != majority[label]
    assert report["overall"]["precision"] == pytest.approx(precision_score(actual, minority))
    assert report["overall"]["recall"] == pytest.approx(recall_score(actual, minority))

    # Validation keeps the true tissue-ratio groups.
    config = run_log.read_config(workdir)
    validation = run_log.rows_of(run_log.read_metrics(workdir), "validation")
    assert validation[-1]["step"] == config.training.steps
    assert "group_accuracy/tumour, r < 0.1" in validation[-1]


def test_bad_pseudo_group_configs_are_named(scoring_run, tiny_config, tmp_path):
    scoring, _ = scoring_run
    cases = []
    for fraction in (0.0, 1.0, 1.5, float("nan")):
        config = _pseudo_config(tiny_config, scoring)
        config.method.pseudo_groups.fraction = fraction
        cases.append((config, "method.pseudo_groups.fraction"))
    cases.append((_pseudo_config(tiny_config, tmp_path / "nowhere"), "method.pseudo_groups.scoring_workdir"))
    cases.append((_pseudo_config(tiny_config, scoring, "erm"), "method.pseudo_groups.scoring_workdir"))
    for checkpoint in ("best_loss", "999"):
        config = _pseudo_config(tiny_config, scoring)
        config.method.pseudo_groups.scoring_checkpoint = checkpoint
        cases.append((config, "method.pseudo_groups.scoring_checkpoint"))
    for i, (config, key) in enumerate(cases):
        with pytest.raises(ConfigError, match=re.escape(key)):
            registry.train(config, tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}").exists()


def test_demo_switches_are_the_scoring_run_and_gerne_on_its_pseudo_groups():
    from configs import demo

    erm, scoring = demo.get_config("erm"), demo.get_config("erm_scoring")
    gerne, pseudo = demo.get_config("gerne"), demo.get_config("gerne_pseudo")
    # The scoring run is ERM with learning rate / 10 and weight decay x 2, nothing else changed.
    assert scoring.optimizer.learning_rate == pytest.approx(erm.optimizer.learning_rate / 10)
    assert scoring.optimizer.weight_decay == pytest.approx(erm.optimizer.weight_decay * 2)
    for key in ("learning_rate", "weight_decay"):
        scoring.optimizer[key] = erm.optimizer[key]
    assert scoring.to_dict() == erm.to_dict()
    # gerne_pseudo is the demo's GERNE on the scoring run's pseudo-groups, at the comparison's beta = 1.
    assert pseudo_groups.enabled(pseudo) and not pseudo_groups.enabled(gerne)
    assert pseudo.method.pseudo_groups.scoring_checkpoint == "best_bca"
    assert (pseudo.method.beta, gerne.method.beta) == (1.0, 0.5)
    pseudo.method.pseudo_groups.scoring_workdir = ""
    pseudo.method.beta = gerne.method.beta
    assert pseudo.to_dict() == gerne.to_dict()
