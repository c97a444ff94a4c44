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

from configs import demo as demo_config
from experiments import grid, reproduce


def _rows(seed_values, checkpoint="best_wga"):
    """Rows as collect_rows makes them; seed_values: setting -> list of (val, test) of the checkpoint's
    metric (WGA for best_wga, BCA for best_bca); the other metric is constant over settings."""
    metric, other = ("WGA", "BCA") if checkpoint == "best_wga" else ("BCA", "WGA")
    rows = []
    for setting, values in seed_values.items():
        for seed, (val, test) in enumerate(values):
            rows.append({"family": grid.family(setting), "setting": setting, "seed": seed,
                         "checkpoint": checkpoint, "step": 100, "tau": "tau=0.1",
                         f"val {metric}": val, f"test {metric}": test,
                         f"val {other}": 0.9, f"test {other}": 0.9 - 0.01 * seed})
    return rows


def test_run_names_are_distinct_and_safe():
    settings = ["erm,lr=0.01", "erm,lr=0.001", "gerne,beta=1,lr=0.01", "gerne,beta=1.5,lr=0.01",
                "gerne,tau=0.03+0.2"]
    names = [grid.run_name(s, seed) for s, seed in itertools.product(settings, (0, 1))]
    assert len(set(names)) == len(names)
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+_-")
               for name in names)
    assert grid.run_name("gerne,beta=1,lr=0.003", 2) == "gerne_beta1_lr0.003_seed2"


@pytest.mark.parametrize("checkpoint", ["best_wga", "best_bca"])
def test_tuning_uses_validation_only(checkpoint):
    metric, other = ("WGA", "BCA") if checkpoint == "best_wga" else ("BCA", "WGA")
    rng = np.random.default_rng(0)
    seed_values = {s: [tuple(rng.uniform(0.3, 0.9, 2)) for _ in range(3)]
                   for s in ("erm,lr=0.01", "erm,lr=0.03", "gerne,lr=0.01", "gerne,beta=0.5,lr=0.01")}
    # A setting with the best test figures but the worst validation figures must not be chosen.
    seed_values["gerne,beta=2,lr=0.1"] = [(0.1, 1.0), (0.1, 1.0), (0.1, 1.0)]
    summary = grid.tuned_summary(_rows(seed_values, checkpoint), "test")
    assert [entry["family"] for entry in summary] == ["erm", "gerne"]
    for entry in summary:
        candidates = {s: v for s, v in seed_values.items() if grid.family(s) == entry["family"]}
        best = max(candidates, key=lambda s: statistics.mean(v[0] for v in candidates[s]))
        assert entry["chosen setting"] == best
        assert entry["seeds"] == 3
        assert entry["tuned on"] == f"val {metric}"
        test = [v[1] for v in candidates[best]]
        np.testing.assert_allclose(entry[f"test {metric} mean"], statistics.mean(test))
        np.testing.assert_allclose(entry[f"test {metric} std"], statistics.stdev(test))
        np.testing.assert_allclose(entry[f"test {other} mean"], statistics.mean([0.9, 0.89, 0.88]))


def test_one_seed_has_no_standard_deviation():
    summary = grid.tuned_summary(_rows({"erm,lr=0.01": [(0.5, 0.4)]}), "test")
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
    subprocess.run([sys.executable, "-c", code], check=True, cwd=grid.REPO)
    with grid.claim(workdir) as after_death:
        assert after_death


def test_reproduce_settings_keep_the_family_and_replace_presets():
    assert reproduce.with_presets("gerne,c=0.5,beta=1,lr=0.03", lr="0.1", norm="shared") == \
        "gerne,c=0.5,beta=1,lr=0.1,norm=shared"
    assert reproduce.normalisation_settings("gerne,c=1,beta=0.5,lr=0.01") == \
        ["gerne,c=1,beta=0.5,lr=0.01,norm=shared", "gerne,c=1,beta=0.5,lr=0.03,norm=shared"]
    assert reproduce.normalisation_settings("resample,lr=1") == \
        ["resample,lr=0.3,norm=shared", "resample,lr=1,norm=shared"]
    assert reproduce.upward_settings("gerne,c=0.5,beta=0.5,lr=0.3") == ["gerne,c=0.5,beta=0.5,lr=1"]
    assert reproduce.upward_settings("erm,lr=0.1") == []
    assert reproduce.normalisation_settings("erm,lr=0.1") == \
        ["erm,lr=0.03,norm=shared", "erm,lr=0.1,norm=shared", "erm,lr=0.3,norm=shared"]
    # Every tuning setting is a valid configs/demo.py argument and names a distinct run folder.
    names = {grid.run_name(setting, 0) for setting in reproduce.TUNING_SETTINGS}
    assert len(names) == len(reproduce.TUNING_SETTINGS)
    for setting in reproduce.TUNING_SETTINGS:
        config = demo_config.get_config(setting)
        assert config.optimizer.learning_rate == float(reproduce.presets(setting)["lr"])


def test_reproduce_report_states_the_differences_of_the_tuned_means(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for checkpoint in ("best_wga", "best_bca"):
        for setting in ("erm,lr=0.1", "resample,lr=0.03", "gerne,c=0.5,beta=1,lr=0.03"):
            for seed in range(3):
                wga, bca = rng.uniform(0.5, 0.9), rng.uniform(0.85, 0.99)
                rows.append({"family": grid.family(setting), "setting": setting, "seed": seed,
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

    gap = float(re.search(r"ERM: test BCA - test WGA = ([+-][\d.]+) points", text).group(1))
    assert gap == pytest.approx(100 * (test_mean("erm", "best_wga", "BCA") - test_mean("erm", "best_wga", "WGA")), abs=0.051)
    wga, bca = map(float, re.search(r"gerne - ERM \(both chosen on validation WGA\): WGA ([+-][\d.]+) points, "
                                    r"BCA ([+-][\d.]+) points", text).groups())
    assert wga == pytest.approx(100 * (test_mean("gerne", "best_wga", "WGA") - test_mean("erm", "best_wga", "WGA")), abs=0.051)
    assert bca == pytest.approx(100 * (test_mean("gerne", "best_wga", "BCA") - test_mean("erm", "best_wga", "BCA")), abs=0.051)
    assert "3 settings" in text and "`gerne,c=0.5,beta=1,lr=0.03`" in text


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


def test_a_runs_own_presets_win_over_the_common_ones():
    common = "data_dir=/data/x,norm=group,steps=20"
    shared = demo_config.get_config(grid.run_presets("gerne,c=1,beta=0,lr=0.03,norm=shared", common, 2))
    assert (shared.model.norm, shared.method.c, shared.method.beta) == ("shared", 1.0, 0.0)
    assert (shared.optimizer.learning_rate, shared.training.seed) == (0.03, 2)
    assert (shared.data.dir, shared.training.steps) == ("/data/x", 20)
    plain = demo_config.get_config(grid.run_presets("resample,lr=0.1", common, 0))
    assert plain.model.norm == "group"  # from --set, over configs/demo.py's default for resampling
    assert demo_config.get_config("resample").model.norm == "shared"
