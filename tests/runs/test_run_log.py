"""`run_log.check_config`: which saved configs a run may resume from."""
from __future__ import annotations

import json

import pytest

from configs import default
from gerne_jax.core.errors import ConfigError
from gerne_jax.runs import run_log


def _save_without(workdir, config, dropped: str) -> None:
    """config.json as a version of the code before `dropped` (a `section.key` path) existed would write it."""
    saved = json.loads(config.to_json())
    *sections, key = dropped.split(".")
    node = saved
    for section in sections:
        node = node[section]
    del node[key]
    (workdir / run_log.CONFIG_FILE).write_text(json.dumps(saved))


def test_a_key_added_later_at_its_default_is_no_change(tmp_path):
    config = default.get_config("method=gerne,model=tiny")
    _save_without(tmp_path, config, "method.group_dro.eta")
    run_log.check_config(tmp_path, config, default.get_config())  # resumes
    with pytest.raises(ConfigError, match=r"another config \(method.group_dro.eta: None -> "):
        run_log.check_config(tmp_path, config)  # without the defaults, an added key is a change


def test_a_key_added_later_but_set_away_from_its_default_is_a_change(tmp_path):
    config = default.get_config("method=gerne,model=tiny")
    _save_without(tmp_path, config, "method.group_dro.eta")
    config.method.group_dro.eta = 2 * config.method.group_dro.eta
    with pytest.raises(ConfigError, match=r"another config \(method.group_dro.eta: None -> "):
        run_log.check_config(tmp_path, config, default.get_config())


def test_a_changed_key_is_named(tmp_path):
    config = default.get_config("method=gerne,model=tiny")
    run_log.write_config(tmp_path, config)
    config.method.beta = config.method.beta + 0.25
    with pytest.raises(ConfigError, match=r"method.beta"):
        run_log.check_config(tmp_path, config, default.get_config())
