"""configs/demo.py: each method maps to the SPEC section 3 special case it names; presets apply."""
import pytest

from configs import demo


def test_methods_are_the_spec_special_cases():
    erm, gerne, resample = (demo.get_config(m) for m in ("erm", "gerne", "resample"))
    assert erm.method.name == "erm"
    assert (gerne.method.name, gerne.method.c) == ("gerne", 0.5) and gerne.method.beta > 0
    # Group-balanced resampling is GERNE with c = 1, beta = 0.
    assert (resample.method.name, resample.method.c, resample.method.beta) == ("gerne", 1.0, 0.0)
    # The three differ only in the method and its tuned learning rate and normalisation: same data,
    # architecture and run length.
    for config in (gerne, resample):
        assert {**config.model.to_dict(), "norm": None} == {**erm.model.to_dict(), "norm": None}
        assert config.training.to_dict() == erm.training.to_dict()
        assert config.data.to_dict() == erm.data.to_dict()


def test_presets_override_method_defaults():
    config = demo.get_config("gerne,beta=1.5,lr=0.003,seed=2,tau=0.03+0.2")
    assert config.method.beta == 1.5
    assert config.optimizer.learning_rate == 0.003
    assert config.training.seed == 2
    assert tuple(config.data.taus) == (0.03, 0.2)


def test_default_is_gerne_and_config_is_locked():
    config = demo.get_config()
    assert config.method.name == "gerne"
    with pytest.raises(AttributeError):
        config.method.not_a_key = 1


def test_unknown_method_and_key_are_named():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        demo.get_config("sgd")
    with pytest.raises(ValueError, match="unknown config key 'betta'"):
        demo.get_config("gerne,betta=1")
