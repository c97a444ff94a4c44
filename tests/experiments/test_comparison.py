"""The comparison's protocol: equal budgets, the GERNE arms' c(beta + 1) and implied weights against the
batch plan, the runs each row builds on, the grid's extension at an edge, and portable choices."""
from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from experiments import comparison, comparison_report, grid
from experiments import comparison_rows as rows
from gerne_jax.data import groups

RUNS = pathlib.Path("/runs")


def test_every_row_tunes_the_same_learning_rates_with_one_fixed_setting():
    settings = {row.name: [rows.row_setting(row, lr, RUNS) for lr in comparison.LEARNING_RATES] for row in rows.ROWS}
    assert {len(set(s)) for s in settings.values()} == {len(comparison.LEARNING_RATES)}
    for row in rows.ROWS:
        assert [rows.learning_rate(s) for s in settings[row.name]] == list(comparison.LEARNING_RATES)
        assert {s.family for s in settings[row.name]} == {row.name}
    names = [s.name for row_settings in settings.values() for s in row_settings]
    assert len(names) == len(set(names))  # every run its own folder
    configs = {row.name: grid.run_config(settings[row.name][0], 0, comparison.COMMON) for row in rows.ROWS}
    assert {c.model.name for c in configs.values()} == {"tiny"}
    assert {c.model.norm for c in configs.values()} == {"group"}  # one network for every row
    assert {c.optimizer.schedule for c in configs.values()} == {"cosine"}
    assert {c.training.steps for name, c in configs.items() if name != "dfr"} == {1500}
    assert configs["erm_natural"].method.erm.sampling == "natural"
    assert configs["erm"].method.erm.sampling == "class_balanced"


def test_gerne_arms_interpolate_match_resampling_and_extrapolate():
    arms = {row.name: row.k for row in rows.ROWS if row.name.startswith("gerne_k")}
    assert sorted(arms.values()) == [0.75, 1.0, 1.5, 2.0]
    assert rows.ROWS_BY_NAME["resample"].k == 1.0
    counts = np.array([[2549, 1630], [289, 1821]])
    for name in [*arms, "resample"]:
        row = rows.ROWS_BY_NAME[name]
        config = grid.run_config(rows.row_setting(row, 0.1, RUNS), 0)
        plan = groups.make_batch_plan(counts, c=config.method.c, beta=config.method.beta, batch_per_group=1000)
        shares = [float(x) for x in comparison_report.implied_weights(row, counts).split(" / ")]
        np.testing.assert_allclose(shares, plan.group_weights.ravel(), atol=0.006)  # the plan rounds to examples
    natural = comparison_report.implied_weights(rows.ROWS_BY_NAME["erm_natural"], counts)
    natural = [float(x) for x in natural.split(" / ")]
    np.testing.assert_allclose(natural, (counts / counts.sum()).ravel(), atol=0.006)


def test_each_row_trains_first_what_it_builds_on():
    jtt = rows.row_setting(rows.ROWS_BY_NAME["jtt"], 0.03, RUNS)
    pseudo = rows.row_setting(rows.ROWS_BY_NAME["gerne_pseudo"], 0.03, RUNS)
    dfr = rows.row_setting(rows.ROWS_BY_NAME["dfr"], 0.03, RUNS)
    assert comparison.prerequisites([jtt], RUNS) == [rows.IDENTIFICATION]
    assert comparison.prerequisites([pseudo], RUNS) == [rows.SCORING]
    assert comparison.prerequisites([dfr], RUNS) == [rows.erm_setting(0.03)]
    assert rows.learning_rate(dfr) == 0.03
    assert comparison.prerequisites([rows.row_setting(rows.ROWS_BY_NAME["erm"], 0.03, RUNS)], RUNS) == []
    # the attribute-free first runs: class-balanced, never stratified by group
    for setting in (rows.IDENTIFICATION, rows.SCORING):
        assert grid.run_config(setting, 0, comparison.COMMON).method.erm.sampling == "class_balanced"
    scoring = grid.run_config(rows.SCORING, 0, comparison.COMMON)
    erm = grid.run_config(rows.erm_setting(0.1), 0, comparison.COMMON)
    assert scoring.optimizer.weight_decay == pytest.approx(2 * erm.optimizer.weight_decay)
    identification = RUNS / grid.run_name(rows.IDENTIFICATION, 3)
    assert grid.run_config(jtt, 3).method.jtt.identification_workdir == str(identification)


@pytest.mark.parametrize(("tried", "chosen", "added"), [
    ((0.01, 0.03, 0.1, 0.3), 0.3, 1.0), ((0.01, 0.03, 0.1, 0.3), 0.01, 0.003),
    ((0.01, 0.03, 0.1, 0.3), 0.1, None), ((0.3, 1.0), 1.0, None), ((0.001, 0.003), 0.001, None)])
def test_the_grid_grows_past_an_edge_choice_along_the_ladder(tried, chosen, added):
    row = rows.ROWS_BY_NAME["gerne_k2"]
    grown = comparison.extended({row.name: list(tried)}, [rows.row_setting(row, chosen, RUNS)])
    assert grown[row.name] == [*tried, *([added] if added else [])]
    assert all(lr in rows.LADDER for lr in grown[row.name])


def test_chosen_settings_move_to_another_data_set_with_their_rows(tmp_path):
    settings = [rows.row_setting(row, 0.1, tmp_path / "a" / "runs") for row in rows.ROWS]
    rows.save_chosen(tmp_path / "chosen.json", settings, tmp_path / "a" / "runs")
    assert str(tmp_path) not in (tmp_path / "chosen.json").read_text()
    moved = rows.load_chosen(tmp_path / "chosen.json", tmp_path / "b" / "runs")
    assert [(s.family, s.name) for s in moved] == [(s.family, s.name) for s in settings]
    jtt = grid.run_config(moved[rows.ROWS.index(rows.ROWS_BY_NAME["jtt"])], 0)
    assert jtt.method.jtt.identification_workdir.startswith(str(tmp_path / "b" / "runs"))
    assert rows.REFERENCE in {s.family for s in moved}


def test_images_seen_count_both_batches_of_a_pair():
    for row, per_step in (("gerne_k1.5", 2), ("resample", 2), ("erm", 1), ("jtt", 1), ("dfr", 0)):
        setting = rows.row_setting(rows.ROWS_BY_NAME[row], 0.1, RUNS)
        assert comparison_report.images_seen(setting, comparison.COMMON) == per_step * 1500 * 2 * 2 * 16


def test_the_comparison_runs_end_to_end_and_its_choices_carry_to_other_data(tmp_path, monkeypatch):
    """Tiny slides and 3 steps: tuning on calibration validation, fresh seeds kept run by run, the report
    from the kept files alone (its WGAs recomputed from the kept probabilities and checked against the
    evaluator's), a second invocation without the runs, and `--settings-from` on other data."""
    monkeypatch.setattr(comparison, "LEARNING_RATES", (0.001, 1.0))  # no edge to grow past
    small = ["--slides", "3", "--size", "512", "--set", "steps=3", "--seeds", "0", "1"]
    kept = tmp_path / "kept"
    assert comparison.main(["--root", str(tmp_path / "runs"), "--kept", str(kept), "--fresh-seeds", "91",
                            "--rows", "erm", "dfr", "gerne_k2", *small]) == 0
    report = (kept / "results.md").read_text()
    assert "## fresh_data91: test split, training seeds 0, 1" in report
    assert {s.family for s in rows.load_chosen(kept / "chosen.json", kept)} == {"erm", "dfr", "gerne_k2"}
    assert len(list((kept / "fresh_data91").glob("*_seed*.npz"))) == 6
    assert not (tmp_path / "runs" / "calibration_data0" / "tuning" / "eval" / "best_wga_test.json").exists()
    assert (kept / "wga_per_seed.png").is_file() and (kept / "fresh_data91_error_vs_tissue_ratio.png").is_file()
    # a later session: the runs are gone, the kept files are enough; nothing is tuned or trained again, and
    # the data regenerated from its seeds give the kept test patches exactly (checked when kept runs are read)
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(grid, "train_all", lambda configs: pytest.fail(f"trained again: {list(configs)}"))
    assert comparison.main(["--root", str(tmp_path / "runs"), "--kept", str(kept), "--fresh-seeds", "91",
                            "--rows", "erm", "dfr", "gerne_k2", *small]) == 0
    assert (kept / "results.md").read_text() == report
    monkeypatch.undo()
    monkeypatch.setattr(comparison, "LEARNING_RATES", (0.001, 1.0))
    other = tmp_path / "other"
    assert comparison.main(["--root", str(other), "--kept", str(other / "kept"), "--settings-from",
                            str(kept / "chosen.json"), "--fresh-seeds", "92", "--rows", "erm", "gerne_k2", *small]) == 0
    assert "## fresh_data92" in (other / "kept" / "results.md").read_text()
    assert not (other / "calibration_data0").exists()  # nothing tuned again


def test_gerne_arms_are_paired_with_resampling_by_seed():
    """Each arm's line: the paired t interval of arm minus resampling over the common seeds (against scipy)
    and the verdict it implies; an arm with fewer than two common seeds gets no line."""
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(5)
    resampling_wga = [0.80, 0.82, 0.78, 0.85, 0.81]

    def entry(wga, seeds):
        return {"seeds": seeds, "wga": wga, "bootstrap": rng.uniform(0.7, 0.9, 50)}

    by_row = {"resample": entry(resampling_wga, [0, 1, 2, 3, 4]),
              "gerne_k0.75": entry([0.83, 0.80, 0.81, 0.86, 0.84], [0, 1, 2, 3, 4]),
              "gerne_k2": entry([0.40, 0.52, 0.45], [0, 2, 4]),
              "gerne_k1.5": entry([0.79], [3])}
    lines = comparison_report.versus_resampling(by_row)
    arms = {line.split(" ")[1]: line for line in lines if line.startswith("- ")}
    assert set(arms) == {"gerne_k0.75", "gerne_k2"}
    for name, seeds in (("gerne_k0.75", [0, 1, 2, 3, 4]), ("gerne_k2", [0, 2, 4])):
        mine = np.asarray(by_row[name]["wga"])
        theirs = np.asarray(resampling_wga)[seeds]
        difference = mine - theirs
        half = scipy_stats.t.ppf(0.975, len(seeds) - 1) * difference.std(ddof=1) / np.sqrt(len(seeds))
        p = scipy_stats.ttest_rel(mine, theirs).pvalue
        expected = (f"{100 * difference.mean():+.1f} [{100 * (difference.mean() - half):+.1f}, "
                    f"{100 * (difference.mean() + half):+.1f}] points, p = {p:.2g}")
        assert expected in arms[name]
        verdict = "below resampling" if difference.mean() + half < 0 else "not different from resampling"
        assert verdict in arms[name]
    assert comparison_report.versus_resampling({k: v for k, v in by_row.items() if k != "resample"}) == []
