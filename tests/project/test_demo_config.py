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
