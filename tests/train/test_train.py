"""The training loop, train.py and evaluate.py on the tiny DATA_DIR, and the configs.

Training: a killed and resumed run ends exactly where an uninterrupted one does, with no metrics row
twice; failures (non-finite loss, another config, an invalid config) leave the workdir in a sane state;
SIGTERM saves before exiting (docs/design.md §7). Evaluation: the reports match a brute-force count on
the arrays the DATA_DIR was written from (docs/design.md §5).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import evaluate
from configs import default, tiny
from data_pipeline.shards import write_patch_dataset
from gerne_jax.core import sharding
from gerne_jax.core.errors import InputError
from gerne_jax.methods import registry
from gerne_jax.models import factory
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.train import extrapolation, train_state, train_step, trainer
from tests.helpers import REPO as ROOT
from tests.helpers import TINY_CHANNELS, TINY_PATCH, kill_training_at_step, tiny_split

PATCH_SHAPE = (TINY_PATCH, TINY_PATCH, len(TINY_CHANNELS))


def _optimizer(config):
    """The optimiser of an ERM or GERNE run of `config`."""
    return extrapolation.optimizer_from_config(config.optimizer, config.training.steps,
                                               extrapolation.beta_schedule(config.method))


def _initial_state(config, model, patch_shape, mesh):
    return train_state.initial_state(config.model, model, _optimizer(config), patch_shape, mesh,
                                     config.training.seed)


def _restore_latest(workdir, config):
    model = factory.create_model(config.model)
    target = _initial_state(config, model, PATCH_SHAPE, sharding.make_mesh())
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        return run.restore(checkpoints.LATEST, target)
    finally:
        run.close()


def _without_timing(rows):
    """Metrics rows without the one value that depends on the machine's speed."""
    return [{key: value for key, value in row.items() if key != "images_per_second"} for row in rows]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    config = tiny_config()
    reference = registry.train(config, tmp_path / "reference")

    # Kill the run as it starts step 4: step 3 is logged, the last checkpoint is step 2, so the resumed
    # run redoes step 3 and must replace its row.
    real_make_train_step = kill_training_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        registry.train(config, tmp_path / "killed")
    killed_rows = run_log.read_metrics(tmp_path / "killed")
    assert max(row["step"] for row in killed_rows) == 3
    monkeypatch.setattr(train_step, "make_train_step", real_make_train_step)
    resumed = registry.train(config, tmp_path / "killed")

    steps = config.training.steps
    assert int(resumed.step) == int(reference.step) == steps
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = run_log.read_metrics(tmp_path / "killed")
    keys = [(row["step"], row["split"]) for row in rows]
    assert len(keys) == len(set(keys))  # no step logged twice
    assert [step for step, split in keys if split == "train"] == list(range(1, steps + 1))
    assert [step for step, split in keys if split == "validation"] == [2, 4]
    assert _without_timing(rows) == _without_timing(run_log.read_metrics(tmp_path / "reference"))
    # The checkpoints carry the config and the validation metrics they were chosen on.
    _, meta = _restore_latest(tmp_path / "killed", config)
    assert meta["step"] == steps and "worst_group_accuracy" in meta["metrics"]
    assert (tmp_path / "killed" / "checkpoints" / "best_wga").is_dir()
    assert list((tmp_path / "killed" / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def diverged_run(tiny_config, tmp_path_factory):
    """A run whose learning rate of 1e30 blows the parameters up within a few steps: its error message,
    workdir and config."""
    config = tiny_config()
    # The learning rate warms up from 0: step 1 is finite and saved, a later one diverges.
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e30, 6
    config.training.steps, config.training.checkpoint_every = 6, 1
    workdir = tmp_path_factory.mktemp("diverged") / "run"
    with pytest.raises(trainer.NonFiniteLossError) as error:
        registry.train(config, workdir)
    return str(error.value), workdir, config


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(diverged_run):
    message, workdir, config = diverged_run
    failed_step = int(re.search(r"non-finite loss .* at step (\d+)", message).group(1))
    saved_step = int(re.search(r"last good checkpoint is step (\d+)", message).group(1))
    _, meta = _restore_latest(workdir, config)
    assert meta["step"] == saved_step < failed_step <= config.training.steps
    assert max(row["step"] for row in run_log.read_metrics(workdir)) < failed_step


@pytest.mark.slow
def test_last_good_checkpoint_of_a_diverged_run_has_finite_parameters(diverged_run):
    _, workdir, config = diverged_run
    state, _ = _restore_latest(workdir, config)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_resuming_with_another_config_is_refused(tiny_config, tmp_path):
    config = tiny_config()
    config.training.steps = 2
    registry.train(config, tmp_path / "run")
    config.method.beta = 0.5
    with pytest.raises(ValueError, match=r"another config \(method.beta: 1.0 -> 0.5\)"):
        registry.train(config, tmp_path / "run")


def test_invalid_config_writes_nothing_into_a_fresh_workdir(tiny_config, tmp_path):
    config = tiny_config()
    config.method.beta = 100.0  # beta_max is 0.75 / (0.5 * (0.75 - 0.5)) - 1 = 5 for these data
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"beta = 100.0 lies outside \[-1, beta_max\]"):
        registry.train(config, workdir)
    assert not (workdir / run_log.CONFIG_FILE).exists()
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
def test_erm_and_evaluate_report_match_brute_force(tiny_config, tiny_data, tmp_path, capsys):
    workdir = tmp_path / "erm"
    registry.train(tiny_config("erm"), workdir)
    assert evaluate.main(["--workdir", str(workdir), "--tau", "0.1", "0.2", "--checkpoint", "latest"]) == 0
    document = json.loads((workdir / "eval" / "latest_test.json").read_text())
    test = tiny_data.splits["test"]
    for tau in (0.1, 0.2):
        report = document["results"][f"tau={tau:g}"]
        for y in (0, 1):
            for a in (0, 1):
                expected = np.sum((test["label"] == y) & ((test["tissue_ratio"] >= np.float32(tau)) == a))
                assert report["group_count"][y][a] == expected
        accuracies = [acc for row, counts in zip(report["group_accuracy"], report["group_count"])
                      for acc, n in zip(row, counts) if n]
        assert report["worst_group_accuracy"] == pytest.approx(min(accuracies))
    for name in ("latest_test_error_vs_tissue_ratio.png", "latest_test_groups_tau=0.1.png"):
        assert (workdir / "eval" / name).stat().st_size > 0
    assert "WGA" in capsys.readouterr().out

    # --compare evaluates both runs the same way and writes one document for both.
    assert evaluate.main(["--compare", str(workdir), str(workdir.parent / "erm"), "--checkpoint", "latest",
                          "--out", str(tmp_path / "cmp")]) == 0


@pytest.mark.slow
def test_evaluate_reports_missing_and_corrupt_checkpoints(tiny_config, tmp_path):
    with pytest.raises(InputError, match="config.json"):
        evaluate.main(["--workdir", str(tmp_path / "nothing")])
    workdir = tmp_path / "run"
    config = tiny_config()
    config.training.steps = 2
    registry.train(config, workdir)
    # Data with another channel count than the run was trained on.
    rng = np.random.default_rng(1)
    five_channels = {name: tiny_split(rng, 20, name[:2]) for name in ("train", "test")}
    for split in five_channels.values():
        split["image"] = np.concatenate([split["image"], split["image"][..., :2]], axis=-1)
    write_patch_dataset(tmp_path / "other", five_channels, channel_names=list("ABCDE"))
    with pytest.raises(checkpoints.CheckpointError, match="does the run's config match the data"):
        evaluate.main(["--workdir", str(workdir), "--data-dir", str(tmp_path / "other")])
    for path in (workdir / "checkpoints" / "best_wga").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"garbage")
    with pytest.raises(checkpoints.DamagedCheckpointError, match="cannot restore .*best_wga.* is not valid JSON"):
        evaluate.main(["--workdir", str(workdir), "--checkpoint", "best_wga"])
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint of step 99"):
        evaluate.main(["--workdir", str(workdir), "--checkpoint", "99"])


@pytest.mark.slow
def test_sigterm_saves_and_exits(tiny_data, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
         f"--config.data.dir={tiny_data.path}", "--config.training.steps=100000",
         "--config.training.eval_every=100000", "--config.training.checkpoint_every=100000",
         f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / run_log.METRICS_FILE
    while process.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    saved_step = run.latest_step()
    run.close()
    last_logged = max(row["step"] for row in run_log.read_metrics(workdir))
    assert saved_step is not None and saved_step >= last_logged


@pytest.mark.slow
def test_sigkill_any_time_leaves_the_checkpoint_before_the_last_logged_step(tiny_data, tmp_path):
    """Checkpoints are written in the background; a logged step waits for the saves before it. So a
    process killed outright (SIGKILL) at any moment has, for its last logged step s, the checkpoint of
    step s - 1 or later on disk, and it restores."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
         f"--config.data.dir={tiny_data.path}", "--config.training.steps=100000",
         "--config.training.eval_every=100000", "--config.training.checkpoint_every=1",
         "--config.training.log_every=1", f"--workdir={workdir}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / run_log.METRICS_FILE
    while process.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 6):
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    last_logged = max(row["step"] for row in run_log.read_metrics(workdir) if row["split"] == "train")
    config = run_log.read_config(workdir)
    _, meta = _restore_latest(workdir, config)
    assert meta["step"] >= last_logged - 1


@pytest.mark.slow
def test_background_saves_hold_the_states_synchronous_saves_hold(tiny_config, tmp_path, monkeypatch):
    """The state is donated to the next step while orbax writes it in the background: every checkpoint
    (latest steps and best ones) must still equal, leaf for leaf, what synchronous saving writes."""
    config = tiny_config("gerne")
    config.training.steps, config.training.checkpoint_every, config.training.eval_every = 8, 1, 1
    config.training.precise_bn_batches = 2
    registry.train(config, tmp_path / "background")
    monkeypatch.setattr(checkpoints, "_saves_in_background", lambda: False)
    registry.train(config, tmp_path / "synchronous")
    model = factory.create_model(config.model)
    target = _initial_state(config, model, PATCH_SHAPE, sharding.make_mesh())
    runs = [checkpoints.RunCheckpoints(tmp_path / name, read_only=True) for name in ("background", "synchronous")]
    try:
        assert runs[0].describe_available() == runs[1].describe_available()
        for name in [*checkpoints.BEST_CHECKPOINTS, 7, 8]:
            (a, meta_a), (b, meta_b) = (run.restore(name, target) for run in runs)
            assert meta_a["step"] == meta_b["step"]
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(name))
    finally:
        for run in runs:
            run.close()


@pytest.mark.slow
def test_init_from_pretrained_weights_defaults_to_frozen_batch_norm(tiny_config, tmp_path):
    from safetensors.numpy import save_file

    from tests.torchvision_weights import torchvision_state_dict

    weights = torchvision_state_dict("tiny", seed=3)
    save_file(weights, str(tmp_path / "tiny.safetensors"))
    config = tiny_config()
    config.training.steps = 1
    config.model.init_from = str(tmp_path / "tiny.safetensors")
    model = factory.create_model(config.model)
    assert model.norm == "frozen"
    state = _initial_state(config, model, PATCH_SHAPE, sharding.make_mesh())
    np.testing.assert_allclose(np.asarray(state.batch_stats["bn1"]["mean"]), weights["bn1.running_mean"])
    trained = registry.train(config, tmp_path / "run")
    # Frozen BatchNorm: the running statistics stay those of the checkpoint.
    np.testing.assert_allclose(np.asarray(trained.batch_stats["bn1"]["var"]), weights["bn1.running_var"])


# ---------------------------------------------------------------------------------------------------
# Configs: declared switches, checked keys, errors that name the key.
# ---------------------------------------------------------------------------------------------------
def test_config_switches_select_method_and_model():
    erm = default.get_config("method=erm,model=tiny")
    assert (erm.method.name, erm.method.beta, erm.model.name) == ("erm", -1.0, "tiny")
    assert default.get_config("erm").to_dict() == default.get_config("method=erm").to_dict()
    gerne = default.get_config()
    assert (gerne.method.name, gerne.method.beta, gerne.method.c, gerne.model.name) == (
        "gerne", 1.0, 0.5, "resnet50")
    # Group-balanced resampling is GERNE with c = 1 and beta = 0.
    resample = default.get_config("resample")
    assert (resample.method.name, resample.method.c, resample.method.beta) == ("gerne", 1.0, 0.0)
    small = tiny.get_config("erm")
    assert (small.method.name, small.model.name, small.training.steps) == ("erm", "tiny", 4)


def test_unknown_switch_or_method_is_named():
    with pytest.raises(ValueError, match=r"unknown config switch 'metod' \(did you mean 'method'\?\)"):
        default.get_config("metod=erm")
    with pytest.raises(ValueError, match=r"unknown config switch 'beta'.*--config.<key>=<value>"):
        default.get_config("gerne,beta=1.5")  # not a switch: changed on the command line
    with pytest.raises(ValueError, match=r"method.name = 'sgd' is not a training method; choose one of \(.*'erm'"):
        default.get_config("sgd")


def test_method_errors_name_the_config_key():
    label, attribute = np.arange(40) % 2, (np.arange(40) // 4) % 2
    config = tiny.get_config("gerne")
    config.method.name = "groupdro"
    with pytest.raises(ValueError, match=r"config method.name = 'groupdro' is not a training method; choose one of"):
        registry.create(config)
    config = tiny.get_config("gerne")
    config.method.c = 1.5
    with pytest.raises(ValueError, match="c = 1.5 must lie in"):
        registry.create(config).prepare({"label": label}, attribute, trainer.Context(config, {}, None))
    config = tiny.get_config("gerne")
    config.optimizer.schedule = "linear"
    with pytest.raises(ValueError, match="config optimizer.schedule must be 'constant' or 'cosine'"):
        extrapolation.learning_rate_schedule(config.optimizer, config.training.steps)


@pytest.mark.parametrize("norm", ["group", "shared"])
def test_abstract_state_describes_the_initial_state_leaf_for_leaf(tiny_config, norm):
    """The restore target evaluate_run builds without compiling: same paths, shapes, dtypes, placement."""
    config = tiny_config()
    config.model.norm = norm
    mesh = sharding.make_mesh(1)
    model = factory.create_model(config.model)
    patch_shape = (TINY_PATCH, TINY_PATCH, len(TINY_CHANNELS))
    abstract = jax.tree_util.tree_flatten_with_path(train_state.abstract_state(
        model, _optimizer(config), patch_shape, mesh, config.training.seed))[0]
    concrete = jax.tree_util.tree_flatten_with_path(_initial_state(config, model, patch_shape, mesh))[0]
    assert [path for path, _ in abstract] == [path for path, _ in concrete]
    for (path, spec), (_, leaf) in zip(abstract, concrete):
        assert (spec.shape, spec.dtype) == (leaf.shape, leaf.dtype), jax.tree_util.keystr(path)
        assert spec.sharding == leaf.sharding, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_a_run_saved_before_a_key_existed_resumes_through_the_train_command(tiny_data, tmp_path):
    """The train command hands configs/default.py's values to the config check: a saved config without a
    key that later versions added resumes while the key keeps its default, and is refused once it does not."""
    workdir = tmp_path / "run"

    def train(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gerne_jax", "train", "--config", "tiny:erm",
                               f"--config.data.dir={tiny_data.path}", f"--workdir={workdir}", *overrides],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    assert train("--config.training.steps=2").returncode == 0
    saved = json.loads((workdir / run_log.CONFIG_FILE).read_text())
    del saved["method"]["group_dro"]["eta"]  # as a version before the key existed saved it
    (workdir / run_log.CONFIG_FILE).write_text(json.dumps(saved))
    resumed = train("--config.training.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((workdir / run_log.METRICS_FILE).read_text().splitlines()[-1])["step"] == 4
    (workdir / run_log.CONFIG_FILE).write_text(json.dumps(saved))
    refused = train("--config.training.steps=6", "--config.method.group_dro.eta=0.5")
    assert refused.returncode == 2 and "method.group_dro.eta: None -> 0.5" in refused.stderr
