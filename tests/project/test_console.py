"""The `gerne-jax` console tool: its commands, their `--help`, configs by name, and the installed wheel.

The wheel test is what a user of `pip install .` (not editable) gets: the wheel is built from this
checkout, installed without dependencies into a folder of its own, and run from another directory,
so nothing of the checkout (its root on sys.path, its configs/ folder) can stand in for the package.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from data_pipeline import commands as data_commands
from gerne_jax.commands import evaluate, predict, train
from gerne_jax.core.errors import InputError
from gerne_jax.methods import registry
from tests.helpers import REPO as ROOT

COMMANDS = ("evaluate", "predict", "stats", "synthetic", "tile", "train")
# Modules that take seconds to import; `--help` must not wait for any of them.
SLOW_IMPORTS = ("jax", "tensorflow", "orbax", "flax", "tensorflow_datasets", "apache_beam")
# Prints what `gerne-jax ARGS` printed, its exit status and which slow modules it imported, as JSON.
HARNESS = textwrap.dedent(f"""
    import contextlib, io, json, sys
    from gerne_jax import console
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            console.main(sys.argv[1:])
        except SystemExit as stop:
            code = stop.code
    slow = sorted(name for name in {SLOW_IMPORTS!r} if name in sys.modules)
    print(json.dumps({{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "slow": slow}}))
""")


def console(*args: str, cwd: pathlib.Path = ROOT) -> dict:
    completed = subprocess.run([sys.executable, "-c", HARNESS, *args], cwd=cwd, capture_output=True, text=True,
                               check=True)
    return {**json.loads(completed.stdout.splitlines()[-1]), "process_stderr": completed.stderr}


def package_configs() -> list[str]:
    return sorted(path.stem for path in (ROOT / "configs").glob("*.py") if not path.name.startswith("_"))


def test_the_tool_lists_every_command_with_its_summary():
    result = console("--help")
    assert result["code"] == 0
    listed = [line.split()[0] for line in result["stdout"].splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert result["slow"] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help_with_status_0_and_no_library_output(command):
    result = console(command, "--help")
    assert result["code"] in (0, None), result
    assert result["stdout"].startswith(f"usage: gerne-jax {command}")
    assert result["stderr"] == "" and result["process_stderr"] == ""  # no warnings of any library
    assert result["slow"] == [], f"`gerne-jax {command} --help` imported {result['slow']}"


def test_train_help_names_the_configs_the_method_switches_and_where_the_keys_are():
    text = console("train", "--help")["stdout"]
    for name in package_configs():
        assert f"\n  {name} " in text
    for method in (*registry.names(), "resample"):
        assert method in text
    assert "docs/configs.md" in text
    # With a config named, its keys and values follow.
    keyed = console("train", "--config", "demo:erm", "--help")["stdout"]
    assert "keys of --config=" in keyed and "batch_per_group: 16" in keyed and "name: erm" in keyed


def test_a_config_by_name_is_the_package_file_of_that_name():
    by_name, workdir = train.parse_flags(["--config", "demo:erm", "--workdir", "w", "--config.training.steps=7"])
    by_name = by_name.to_dict()
    by_path, _ = train.parse_flags([f"--config={ROOT / 'configs' / 'demo.py'}:erm", "--workdir", "w",
                                    "--config.training.steps=7"])
    assert by_name == by_path.to_dict() and by_name["training"]["steps"] == 7 and workdir == "w"
    with pytest.raises(InputError, match="unknown config 'dmeo'.*default, demo, tiny"):
        train.parse_flags(["--config", "dmeo:erm", "--workdir", "w"])


def test_an_unknown_command_is_one_line_naming_the_closest():
    result = console("tiel")
    assert result["code"] == 2
    assert result["stderr"].strip().splitlines() == [
        f"error: unknown command 'tiel' (did you mean 'tile'?); choose one of {', '.join(COMMANDS)} "
        "(gerne-jax --help)"]


def test_choices_spelled_out_for_a_fast_help_are_the_modules_own():
    from data_pipeline import tile_manifest
    from gerne_jax.core import distributed
    from gerne_jax.runs import checkpoints

    assert evaluate.DISTRIBUTED_MODES == distributed.MODES
    names = ", ".join([*checkpoints.BEST_CHECKPOINTS, checkpoints.LATEST])
    assert evaluate.CHECKPOINT_HELP == f"{names}, or a step number"
    runner = next(action for action in _tile_parser()._actions if action.dest == "runner")
    assert runner.metavar == "{" + ",".join(tile_manifest.RUNNERS) + "}"
    assert predict.parse_args(["--workdir", "w", "--manifest", "m", "--out", "o"]).checkpoint == "best_wga"


def _tile_parser():
    import argparse

    parser = argparse.ArgumentParser()
    data_commands.ARGUMENTS["tile"](parser)
    return parser


def pip(args: list[str]) -> None:
    completed = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    assert completed.returncode == 0, f"pip {' '.join(args)}:\n{completed.stderr[-3000:]}"


@pytest.mark.slow
def test_the_wheel_installed_without_dependencies_runs_the_pipeline_from_another_directory(tmp_path):
    source, wheels, target, elsewhere = (tmp_path / name for name in ("source", "wheels", "site", "elsewhere"))
    elsewhere.mkdir()
    # Built from a copy: setuptools writes build/ and *.egg-info/ into the tree it builds.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__"))
    pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)])
    (wheel,) = wheels.glob("gerne_jax-*.whl")
    pip(["install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(target / "bin" / "gerne-jax"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import configs, data_pipeline, gerne_jax; "
                            "print(configs.__file__, data_pipeline.__file__, gerne_jax.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(pathlib.Path(path).is_relative_to(target) for path in where), where
    for command in COMMANDS:
        helped = run(command, "--help")
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: gerne-jax {command}"), helped.stderr

    steps = [("synthetic", "--out", "slides", "--slides", "3", "--size", "512"),
             ("tile", "--manifest", "slides/manifest.csv", "--out", "data", "--patch-size", "64"),
             ("train", "--config", "tiny:erm", "--config.data.dir=data", "--workdir", "run"),
             ("predict", "--workdir", "run", "--checkpoint", "latest", "--manifest", "slides/manifest.csv",
              "--out", "predicted")]
    for step in steps:
        completed = run(*step)
        assert completed.returncode == 0, f"gerne-jax {' '.join(step)}:\n{completed.stderr[-3000:]}"
    with open(elsewhere / "predicted" / "slides.csv", newline="") as handle:
        predicted = {row["slide_id"] for row in csv.DictReader(handle)}
    with open(elsewhere / "slides" / "manifest.csv", newline="") as handle:
        assert predicted == {row["slide_id"] for row in csv.DictReader(handle)}
