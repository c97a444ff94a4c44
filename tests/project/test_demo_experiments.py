"""experiments/grid.py and reproduce.py: run folder names, validation-only tuning, shared training."""
import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from data_pipeline.shards import write_patch_dataset
from experiments import grid, reproduce
from experiments.grid import Setting
from gerne_jax.evaluation import evaluate
from gerne_jax.methods import registry
from tests.helpers import REPO

LR = "optimizer.learning_rate"


def _rows(seed_values, checkpoint="best_wga"):
    """Rows as collect_rows makes them; seed_values: Setting -> list of (val, test) of the checkpoint's
    metric (WGA for best_wga, BCA for best_bca); the other metric is constant over settings."""
    metric, other = ("WGA", "BCA") if checkpoint == "best_wga" else ("BCA", "WGA")
    rows = []
    for setting, values in seed_values.items():
        for seed, (val, test) in enumerate(values):
            rows.append({"family": setting.family, "setting": setting.name, "seed": seed,
                         "checkpoint": checkpoint, "step": 100, "tau": "tau=0.1",
                         f"val {metric}": val, f"test {metric}": test,
                         f"val {other}": 0.9, f"test {other}": 0.9 - 0.01 * seed})
    return rows


def test_run_names_are_distinct_safe_and_those_of_the_old_preset_strings():
    settings = [Setting("erm", {LR: 0.01}), Setting("erm", {LR: 0.001}),
                Setting("gerne", {"method.beta": 1.0, LR: 0.01}),
                Setting("gerne", {"method.beta": 1.5, LR: 0.01}),
                Setting("gerne", {"data.taus": [0.03, 0.2]}), Setting("gerne", {"method.corr": 0.3})]
    names = [grid.run_name(s, seed) for s, seed in itertools.product(settings, (0, 1))]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9.+_-]+", name) for name in names)
    # The folders `make experiments` wrote when settings were preset strings keep their names.
    old = {"gerne,beta=1,lr=0.003": (Setting("gerne", {"method.beta": 1.0, LR: 0.003}), 2),
           "gerne,c=0.5,beta=0.5,lr=0.1": (Setting("gerne", {LR: 0.1, "method.beta": 0.5, "method.c": 0.5}),
                                           0),
           "resample,lr=0.03,norm=shared": (Setting("resample", {"model.norm": "shared", LR: 0.03}), 1),
           "gerne,tau=0.03+0.2": (Setting("gerne", {"data.taus": (0.03, 0.2)}), 0)}
    for preset, (setting, seed) in old.items():
        old_name = re.sub(r"[^A-Za-z0-9.+_-]", "", preset.replace(",", "_").replace("=", "")) + f"_seed{seed}"
        assert grid.run_name(setting, seed) == old_name
        assert grid.parse_setting(preset) == setting  # the command line's form gives the same value
    assert grid.run_name(Setting("gerne", {"method.beta": 1.0, LR: 0.003}), 2) == "gerne_beta1_lr0.003_seed2"
    # Equal settings are one folder, and one dict key, whatever the order their overrides came in.
    one, other = Setting("gerne", {"method.c": 0.5, LR: 0.1}), Setting("gerne", {LR: 0.1, "method.c": 0.5})
    assert one == other and len({one, other}) == 1 and one.name == other.name


@pytest.mark.parametrize("checkpoint", ["best_wga", "best_bca"])
def test_tuning_uses_validation_only(checkpoint):
    metric, other = ("WGA", "BCA") if checkpoint == "best_wga" else ("BCA", "WGA")
    rng = np.random.default_rng(0)
    settings = [Setting("erm", {LR: 0.01}), Setting("erm", {LR: 0.03}), Setting("gerne", {LR: 0.01}),
                Setting("gerne", {"method.beta": 0.5, LR: 0.01})]
    seed_values = {s: [tuple(rng.uniform(0.3, 0.9, 2)) for _ in range(3)] for s in settings}
    # A setting with the best test figures but the worst validation figures must not be chosen.
    seed_values[Setting("gerne", {"method.beta": 2.0, LR: 0.1})] = [(0.1, 1.0), (0.1, 1.0), (0.1, 1.0)]
    summary = grid.tuned_summary(_rows(seed_values, checkpoint), "test")
    assert [entry["family"] for entry in summary] == ["erm", "gerne"]
    chosen = grid.chosen_settings(summary, list(seed_values))[checkpoint]
    for entry, setting in zip(summary, chosen):
        candidates = {s: v for s, v in seed_values.items() if s.family == entry["family"]}
        best = max(candidates, key=lambda s: statistics.mean(v[0] for v in candidates[s]))
        assert setting == best and entry["chosen setting"] == best.name
        assert entry["seeds"] == 3
        assert entry["tuned on"] == f"val {metric}"
        test = [v[1] for v in candidates[best]]
        np.testing.assert_allclose(entry[f"test {metric} mean"], statistics.mean(test))
        np.testing.assert_allclose(entry[f"test {metric} std"], statistics.stdev(test))
        np.testing.assert_allclose(entry[f"test {other} mean"], statistics.mean([0.9, 0.89, 0.88]))


def test_one_seed_has_no_standard_deviation():
    summary = grid.tuned_summary(_rows({Setting("erm", {LR: 0.01}): [(0.5, 0.4)]}), "test")
    assert np.isnan(summary[0]["test WGA std"]) and summary[0]["test WGA mean"] == 0.4


def test_claim_is_exclusive_and_released_when_its_holder_dies(tmp_path):
    workdir = tmp_path / "run_seed0"
    with grid.claim(workdir) as first:
        with grid.claim(workdir) as second:  # another open file description: a second process's view
            assert first and not second
    with grid.claim(workdir) as again:
        assert again
    # A process killed while holding the claim (no clean-up code runs) leaves the run free.
    code = ("import os, pathlib; from experiments import grid\n"
            f"with grid.claim(pathlib.Path({str(workdir)!r})) as mine:\n"
            "    assert mine\n    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with grid.claim(workdir) as after_death:
        assert after_death


def test_a_run_left_unfinished_by_another_process_is_resumed_not_reported(tmp_path, monkeypatch):
    workdir = tmp_path / "erm_seed0"
    # Another process claims the run and dies without finishing it (as a killed grid process does).
    code = ("import os, pathlib, sys, time; from experiments import grid\n"
            f"with grid.claim(pathlib.Path({str(workdir)!r})) as mine:\n"
            "    print('claimed', mine, flush=True); time.sleep(1.0); os._exit(0)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().split() == ["claimed", "True"]
    trained = []
    monkeypatch.setattr(registry, "train", lambda config, folder: trained.append((config, folder)))
    grid.train_all({workdir: "the run's config"})  # waits for the holder, then trains the run itself
    holder.wait()
    assert trained == [("the run's config", workdir)]


def test_reproduce_settings_keep_the_family_and_replace_overrides():
    def gerne(c, beta, lr, **more):
        return Setting("gerne", {"method.c": c, "method.beta": beta, LR: lr, **more})

    shared = {"model.norm": "shared"}
    assert gerne(0.5, 1.0, 0.03).updated({LR: 0.1, **shared}) == gerne(0.5, 1.0, 0.1, **shared)
    assert reproduce.normalisation_settings(gerne(1.0, 0.5, 0.01)) == \
        [gerne(1.0, 0.5, 0.01, **shared), gerne(1.0, 0.5, 0.03, **shared)]
    assert reproduce.normalisation_settings(Setting("resample", {LR: 1.0})) == \
        [Setting("resample", {LR: 0.3, **shared}), Setting("resample", {LR: 1.0, **shared})]
    assert reproduce.upward_settings(gerne(0.5, 0.5, 0.3)) == [gerne(0.5, 0.5, 1.0)]
    assert reproduce.upward_settings(Setting("erm", {LR: 0.1})) == []
    assert [s.name for s in reproduce.normalisation_settings(Setting("erm", {LR: 0.1}))] == \
        ["erm_lr0.03_normshared", "erm_lr0.1_normshared", "erm_lr0.3_normshared"]
    # Every tuning setting makes a valid config and names a distinct run folder.
    names = {grid.run_name(setting, 0) for setting in reproduce.TUNING_SETTINGS}
    assert len(names) == len(reproduce.TUNING_SETTINGS)
    for setting in reproduce.TUNING_SETTINGS:
        assert grid.run_config(setting, 0).optimizer.learning_rate == setting.overrides[LR]


def test_reproduce_report_states_the_differences_of_the_tuned_means(tmp_path):
    rng = np.random.default_rng(1)
    settings = [Setting("erm", {LR: 0.1}), Setting("resample", {LR: 0.03}),
                Setting("gerne", {"method.c": 0.5, "method.beta": 1.0, LR: 0.03})]
    rows = []
    for checkpoint in ("best_wga", "best_bca"):
        for setting in settings:
            for seed in range(3):
                wga, bca = rng.uniform(0.5, 0.9), rng.uniform(0.85, 0.99)
                rows.append({"family": setting.family, "setting": setting.name, "seed": seed,
                             "checkpoint": checkpoint, "step": 100, "tau": "tau=0.1", "val WGA": wga + 0.01,
                             "test WGA": wga, "val BCA": bca + 0.01, "test BCA": bca})
    summary = grid.tuned_summary(rows, "test")
    for folder in ("seeds", "tuning"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "summary.json").write_text(json.dumps(summary))
    with open(tmp_path / "tuning" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = reproduce.write_report(tmp_path).read_text()

    def test_mean(family, checkpoint, metric):
        return statistics.mean(r[f"test {metric}"] for r in rows
                               if r["family"] == family and r["checkpoint"] == checkpoint)

    def points(family, metric, other_family, other_metric):
        return pytest.approx(100 * (test_mean(family, "best_wga", metric)
                                    - test_mean(other_family, "best_wga", other_metric)), abs=0.051)

    gap = float(re.search(r"ERM: test BCA - test WGA = ([+-][\d.]+) points", text).group(1))
    assert gap == points("erm", "BCA", "erm", "WGA")
    wga, bca = map(float, re.search(r"gerne - ERM \(both chosen on validation WGA\): WGA ([+-][\d.]+) "
                                    r"points, BCA ([+-][\d.]+) points", text).groups())
    assert wga == points("gerne", "WGA", "erm", "WGA")
    assert bca == points("gerne", "BCA", "erm", "BCA")
    assert "3 settings" in text and "`gerne_c0.5_beta1_lr0.03`" in text


def test_evaluation_stamp_changes_with_any_run_and_the_split(tmp_path):
    workdirs = [tmp_path / "erm_lr0.1_seed0", tmp_path / "gerne_lr0.1_seed0"]
    for workdir in workdirs:
        workdir.mkdir()
        (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    stamp = json.loads(json.dumps(grid.evaluation_stamp(workdirs, "test")))  # as stored and read back
    assert grid.evaluation_stamp(workdirs, "test") == stamp
    assert grid.evaluation_stamp(workdirs, "validation") != stamp
    assert grid.evaluation_stamp(workdirs[:1], "test") != stamp
    os.utime(workdirs[1] / "metrics.jsonl", ns=(1, 1))  # a run that trained on
    assert grid.evaluation_stamp(workdirs, "test") != stamp


def test_a_runs_own_overrides_win_over_the_common_ones():
    common = {"data.dir": "/data/x", "model.norm": "separate", "training.steps": 20}
    own = Setting("gerne", {"method.c": 1.0, "method.beta": 0.0, LR: 0.03, "model.norm": "shared"})
    shared = grid.run_config(own, 2, common)
    assert (shared.model.norm, shared.method.c, shared.method.beta) == ("shared", 1.0, 0.0)
    assert (shared.optimizer.learning_rate, shared.training.seed) == (0.03, 2)
    assert (shared.data.dir, shared.training.steps) == ("/data/x", 20)
    plain = grid.run_config(Setting("resample", {LR: 0.1}), 0, common)
    assert plain.model.norm == "separate"  # from common, over configs/demo.py's default for resampling
    assert grid.run_config(Setting("resample"), 0).model.norm == "group"
    # The demo warms up and decays its learning rate; the experiments keep the constant one they were
    # tuned with, unless a common or own override says otherwise.
    assert (demo.get_config("gerne").optimizer.schedule, demo.get_config("gerne").optimizer.warmup_steps) == \
        ("cosine", 100)
    assert (plain.optimizer.schedule, plain.optimizer.warmup_steps) == ("constant", 0)
    decayed = grid.run_config(Setting("erm", {"optimizer.schedule": "cosine"}), 0, {"optimizer.warmup_steps": 10})
    assert (decayed.optimizer.schedule, decayed.optimizer.warmup_steps) == ("cosine", 10)
    # The seed is the grid's: a setting or common override of it is refused, not silently replaced.
    with pytest.raises(ValueError, match="training.seed"):
        grid.run_config(Setting("erm", {"training.seed": 3}), 0)
    # Misspelt keys name the closest valid one; the command line's aliases give the same dotted keys.
    with pytest.raises(ValueError, match="method.beta"):
        grid.run_config(Setting("gerne", {"method.betta": 1.0}), 0)
    assert grid.parse_overrides("steps=20,tau=0.03+0.2,data_dir=/data/x") == \
        {"training.steps": 20, "data.taus": (0.03, 0.2), "data.dir": "/data/x"}


def test_a_run_built_on_another_run_of_its_seed_names_it_by_folder():
    # JTT's identification run of the same seed: `{seed}` becomes each run's seed, and the run's
    # folder name carries the other run's folder name without its seed.
    setting = Setting("jtt", {"method.jtt.identification_workdir": "/r/runs/erm_lr0.1_steps300_seed{seed}",
                              "method.jtt.upweight": 5.0})
    assert [grid.run_config(setting, seed).method.jtt.identification_workdir for seed in (0, 2)] == \
        ["/r/runs/erm_lr0.1_steps300_seed0", "/r/runs/erm_lr0.1_steps300_seed2"]
    assert grid.run_name(setting, 2) == "jtt_iderm_lr0.1_steps300_lambda5_seed2"


# ---------------------------------------------------------------------------------------------------
# run_grid end to end on a tiny DATA_DIR.
# ---------------------------------------------------------------------------------------------------
PATCH = 8
TINY = {"training.steps": 4, "training.batch_per_group": 2, "training.eval_every": 2,
        "training.checkpoint_every": 2, "training.log_every": 1, "data.eval_batch_size": 32,
        "model.name": "tiny"}


def _split(rng, n, slide):
    """Both classes in both tissue bins at tau 0.1; the tumour class brightens channel 0."""
    label = np.arange(n) % 2
    tissue_ratio = np.where(np.arange(n) % 4 < 2, rng.uniform(0.01, 0.09, n), rng.uniform(0.2, 1.0, n))
    image = rng.integers(0, 200, (n, PATCH, PATCH, 3)).astype(np.uint8)
    image[label == 1, :, :, 0] += 40
    return {"image": image, "label": label, "tumour_fraction": label * 0.5, "tissue_ratio": tissue_ratio,
            "slide_id": np.array([f"{slide}{i % 3}" for i in range(n)]),
            "patient_id": np.array([f"{slide}{i % 3}" for i in range(n)]),
            "x": np.arange(n) * PATCH, "y": np.zeros(n, np.int64)}


def test_run_grid_trains_evaluates_tunes_and_reuses_its_results(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "data"
    write_patch_dataset(data_dir, {"train": _split(rng, 200, "tr"), "validation": _split(rng, 60, "va"),
                                   "test": _split(rng, 60, "te")}, channel_names=["CARS", "TPEF", "SHG"])
    settings = [Setting("erm", {LR: 0.01}), Setting("gerne", {"method.c": 0.5, "method.beta": 0.5, LR: 0.01})]
    common = {**TINY, "data.dir": str(data_dir)}
    summary = grid.run_grid(settings, [0], tmp_path / "grid", common=common)

    with open(tmp_path / "grid" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["setting"], row["checkpoint"]) for row in rows] == \
        [(s.name, checkpoint) for checkpoint in grid.CHECKPOINTS for s in settings]
    assert {row["tau"] for row in rows} == {"tau=0.1"}
    assert all(0 <= float(row["test WGA"]) <= float(row["test BCA"]) <= 1 for row in rows)
    assert [(e["family"], e["checkpoint"]) for e in summary] == \
        [(s.family, checkpoint) for checkpoint in grid.CHECKPOINTS for s in settings]
    assert grid.chosen_settings(summary, settings) == dict.fromkeys(grid.CHECKPOINTS, settings)
    for name in ("results.md", "summary.json", "summary.png", "eval/best_wga_test.json",
                 "eval/best_bca_test.json"):
        assert (tmp_path / "grid" / name).is_file(), name

    # A second call finds every run finished and the stamp current: no training, no evaluate.
    def refuse(*args, **kwargs):
        raise AssertionError("called again")

    monkeypatch.setattr(registry, "train", refuse)
    monkeypatch.setattr(evaluate, "evaluate_run", refuse)
    again = grid.run_grid(settings, [0], tmp_path / "grid", common=common)
    assert json.dumps(again) == json.dumps(summary)  # as text: one seed's std is NaN, never equal to itself
