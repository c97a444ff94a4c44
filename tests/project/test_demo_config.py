"""configs/demo.py: each method is the docs/design.md §3 special case it names, in a plain ConfigDict."""
import ml_collections
import pytest

from configs import demo


def test_methods_are_the_special_cases_of_gerne():
    erm, gerne, resample = (demo.get_config(m) for m in ("erm", "gerne", "resample"))
    assert erm.method.name == "erm"
    assert (gerne.method.name, gerne.method.c, gerne.method.beta) == ("gerne", 0.5, 0.5)
    # Group-balanced resampling is GERNE with c = 1, beta = 0.
    assert (resample.method.name, resample.method.c, resample.method.beta) == ("gerne", 1.0, 0.0)
    # The three differ only in the method and its tuned learning rate and normalisation: same data,
    # architecture and run length.
    for config in (gerne, resample):
        assert {**config.model.to_dict(), "norm": None} == {**erm.model.to_dict(), "norm": None}
        assert config.training.to_dict() == erm.training.to_dict()
        assert config.data.to_dict() == erm.data.to_dict()


def test_config_is_a_plain_config_dict_whose_values_can_be_changed():
    config = demo.get_config("gerne")
    assert type(config) is ml_collections.ConfigDict
    config.method.beta = 1.5
    config.optimizer.learning_rate = 0.003
    config.data.taus = (0.03, 0.2)
    assert (config.method.beta, config.optimizer.learning_rate) == (1.5, 0.003)
    assert tuple(config.data.taus) == (0.03, 0.2)
    assert demo.get_config("gerne").method.beta == 0.5  # every call builds a fresh config


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'sgd'"):
        demo.get_config("sgd")


def test_the_demo_settings_are_the_comparisons_choice_on_calibration_data():
    """Each method's learning rate and setting are the comparison's kept choice (docs/comparison/chosen.json,
    tuned on calibration validation data); GERNE's is the arm with the best validation WGA there."""
    import csv

    from configs import default
    from experiments import comparison, grid
    from experiments.comparison_rows import load_chosen
    from gerne_jax.core.config_utils import flatten
    from tests.helpers import REPO

    kept = REPO / "docs" / "comparison"
    chosen = {s.family: s for s in load_chosen(kept / "chosen.json", kept)}
    with open(kept / "tuning.csv", newline="") as f:
        val_wga = {r["setting"]: float(r["val WGA"]) for r in csv.DictReader(f) if r["checkpoint"] == "best_wga"}
    arms = [s for family, s in chosen.items() if family.startswith("gerne_k")]
    best_arm = max(arms, key=lambda s: val_wga[s.name])
    for method, setting in (("erm", chosen["erm"]), ("gerne", best_arm), ("resample", chosen["resample"]),
                            ("group_dro", chosen["group_dro"]), ("gerne_pseudo", chosen["gerne_pseudo"])):
        shipped = flatten(demo.get_config(method))
        protocol = flatten(grid.run_config(setting, 0, comparison.COMMON))
        for key in [*setting.overrides, "model.norm"]:
            if not key.endswith("workdir"):
                assert shipped[key] == protocol[key], (method, key)
    assert flatten(demo.get_config("erm"))["method.erm.sampling"] == "class_balanced"
    assert default.get_config("erm").method.erm.sampling == "groups"  # the library default is unchanged
