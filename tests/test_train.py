"""train.py and evaluate.py on a tiny DATA_DIR: resume, failures, checkpoints, reports."""
import json
import pathlib

import numpy as np
import pytest

import evaluate
import train
from configs import default, tiny
from data_pipeline.shards import write_patch_dataset
from gerne_jax import checkpoints, experiment, train_step

PATCH = 8


def _split(rng, n, slide):
    label = rng.integers(0, 2, n)
    tissue_ratio = np.where(label == 1, rng.uniform(0.05, 1.0, n), rng.uniform(0.01, 0.6, n)).astype(np.float32)
    image = rng.integers(0, 200, (n, PATCH, PATCH, 3)).astype(np.uint8)
    image[label == 1, :, :, 0] += 40  # a learnable tumour signature in channel 0
    return {"image": image, "label": label, "tumor_fraction": label * 0.5, "tissue_ratio": tissue_ratio,
            "slide_id": np.array([f"{slide}{i % 3}" for i in range(n)]),
            "patient_id": np.array([f"{slide}{i % 3}" for i in range(n)]),
            "x": np.arange(n) * PATCH, "y": np.zeros(n, np.int64)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_patch_dataset(path, {"train": _split(rng, 120, "tr"), "validation": _split(rng, 40, "va"),
                               "test": _split(rng, 50, "te")}, channel_names=["CARS", "TPEF", "SHG"])
    return path


def _config(data_dir, arg=""):
    return tiny.get_config(",".join(filter(None, [f"data_dir={data_dir}", arg])))


def _restore_latest(workdir, config, data_dir):
    model = experiment.create_model(config)
    target = experiment.initial_state(config, model, (PATCH, PATCH, 3), train_step.make_mesh())
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        return run.restore(checkpoints.LATEST, target)
    finally:
        run.close()


def _max_relative_difference(a, b):
    import jax
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_killed_and_resumed_run_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    config = _config(data_dir)
    reference = train.train_and_evaluate(config, tmp_path / "reference")

    # Kill the run during step 3 (after the step-2 checkpoint) by making the real step raise.
    real_make_train_step = train_step.make_train_step

    def make_killed_step(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def step(state, batch):
            if int(state.step) == 2:
                raise KeyboardInterrupt("simulated kill")
            return step_fn(state, batch)
        return step

    monkeypatch.setattr(train_step, "make_train_step", make_killed_step)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path / "killed")
    monkeypatch.setattr(train_step, "make_train_step", real_make_train_step)
    resumed = train.train_and_evaluate(config, tmp_path / "killed")

    assert int(resumed.step) == int(reference.step) == config.training.steps
    assert _max_relative_difference(reference.params, resumed.params) == 0.0
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if line["split"] == "train"]
    assert train_steps == list(range(1, config.training.steps + 1))  # no step logged twice
    # The best checkpoints carry the config and the validation metrics they were chosen on.
    state, meta = _restore_latest(tmp_path / "killed", config, data_dir)
    assert meta["step"] == config.training.steps and "worst_group_accuracy" in meta["metrics"]
    assert (tmp_path / "killed" / "checkpoints" / "best_wga").is_dir()
    assert list((tmp_path / "killed" / "tensorboard").iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    config = _config(data_dir, "lr=1e30,steps=6")
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step"):
        train.train_and_evaluate(config, tmp_path / "run")
    _, meta = _restore_latest(tmp_path / "run", config, data_dir)
    assert meta["step"] < 6


def test_resuming_with_another_config_is_refused(data_dir, tmp_path):
    train.train_and_evaluate(_config(data_dir, "steps=2"), tmp_path / "run")
    with pytest.raises(ValueError, match="method.beta"):
        train.train_and_evaluate(_config(data_dir, "steps=2,beta=0.5"), tmp_path / "run")


def test_erm_and_evaluate_report_match_brute_force(data_dir, tmp_path, capsys):
    workdir = tmp_path / "erm"
    train.train_and_evaluate(_config(data_dir, "method.name=erm,beta=-1"), workdir)
    assert evaluate.main(["--workdir", str(workdir), "--tau", "0.1", "0.2", "--checkpoint", "latest"]) == 0
    document = json.loads((workdir / "eval" / "latest_test.json").read_text())
    rows = [line.split(",") for line in (pathlib.Path(data_dir) / "patches.csv").read_text().splitlines()]
    rows = [dict(zip(rows[0], r)) for r in rows[1:]]
    test_rows = [r for r in rows if r["split"] == "test"]
    for tau in (0.1, 0.2):
        report = document["results"][f"tau={tau:g}"]
        for y in (0, 1):
            for a in (0, 1):
                expected = sum(int(r["label"]) == y and (float(r["tissue_ratio"]) >= tau) == a for r in test_rows)
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


def test_evaluate_reports_missing_and_corrupt_checkpoints(data_dir, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err
    workdir = tmp_path / "run"
    train.train_and_evaluate(_config(data_dir, "steps=2"), workdir)
    # Data with another channel count than the run was trained on.
    rng = np.random.default_rng(1)
    five_channels = {name: _split(rng, 20, name[:2]) for name in ("train", "test")}
    for split in five_channels.values():
        split["image"] = np.concatenate([split["image"], split["image"][..., :2]], axis=-1)
    write_patch_dataset(tmp_path / "other", five_channels, channel_names=list("ABCDE"))
    assert evaluate.main(["--workdir", str(workdir), "--data-dir", str(tmp_path / "other")]) == 2
    assert "does the run's config match the data" in capsys.readouterr().err
    for path in (workdir / "checkpoints" / "best_wga").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"garbage")
    assert evaluate.main(["--workdir", str(workdir), "--checkpoint", "best_wga"]) == 2
    assert "cannot restore" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(workdir), "--checkpoint", "99"]) == 2
    assert "no checkpoint of step 99" in capsys.readouterr().err


def test_config_presets_and_unknown_keys():
    config = default.get_config("tau=0.03+0.2,beta=1.5,lr=0.02,norm=frozen")
    assert config.data.taus == (0.03, 0.2) and config.method.beta == 1.5
    assert config.optimizer.learning_rate == 0.02 and config.model.norm == "frozen"
    with pytest.raises(ValueError, match="unknown config key 'method.bta'"):
        default.get_config("method.bta=1")
    with pytest.raises(AttributeError, match="beta"):
        config.method.bta = 1.0  # locked: a mistyped key lists the valid ones


def test_sigterm_saves_and_exits(data_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    root = pathlib.Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, str(root / "train.py"), f"--config={root / 'configs' / 'tiny.py'}",
         f"--config.data.dir={data_dir}", "--config.training.steps=100000",
         "--config.training.eval_every=100000", "--config.training.checkpoint_every=100000",
         f"--workdir={workdir}"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / "metrics.jsonl"
    while process.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    saved_step = run.latest_step()
    run.close()
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert saved_step is not None and saved_step >= last_logged


def test_init_from_pretrained_weights_defaults_to_frozen_batch_norm(data_dir, tmp_path):
    from safetensors.numpy import save_file

    from tests.test_pretrained import torchvision_state_dict

    weights = torchvision_state_dict("tiny", seed=3)
    save_file(weights, str(tmp_path / "tiny.safetensors"))
    config = _config(data_dir, f"steps=1,model.init_from={tmp_path / 'tiny.safetensors'}")
    model = experiment.create_model(config)
    assert model.norm == "frozen"
    state = experiment.initial_state(config, model, (PATCH, PATCH, 3), train_step.make_mesh())
    np.testing.assert_allclose(np.asarray(state.batch_stats["bn1"]["mean"]), weights["bn1.running_mean"])
    trained = train.train_and_evaluate(config, tmp_path / "run")
    # Frozen BatchNorm: the running statistics stay those of the checkpoint.
    np.testing.assert_allclose(np.asarray(trained.batch_stats["bn1"]["var"]), weights["bn1.running_var"])
