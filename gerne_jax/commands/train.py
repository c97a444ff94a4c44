"""`gerne-jax train`: a patch classifier trained with GERNE, ERM or a baseline (docs/design.md §3).

  gerne-jax train --config default:gerne --workdir runs/gerne [--config.method.beta=1.5 ...]

`--config` is a config of the package by name (`default`, `demo`, `tiny`) or the path of any Python
file with `get_config(arg)`; after the colon come the config's switches (the method, e.g. `demo:erm`).
Any key changes with `--config.KEY=VALUE`. `config.method.name` picks the training method
(`gerne_jax.methods.registry`), whose `train` runs the loop `gerne_jax.train.trainer.train_and_evaluate` (what it
writes, how it resumes) or its own (DFR). Bad input (a mistyped flag, config switch or key, a value outside its range, a
DATA_DIR that is not one, a workdir another run is training in) is answered with one line `error: ...`
and exit status 2, before anything is written into the workdir.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.resources
import importlib.util
import pathlib
import re
import sys
from collections.abc import Iterator

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from gerne_jax.core import cli
from gerne_jax.core.errors import InputError

PROG = "gerne-jax train"
CONFIG_PACKAGE = "configs"
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """`--config` (with its `--config.KEY` overrides) and `--workdir`, on `flag_values`."""
    config_flags.DEFINE_config_file("config", None, "A config by name (default, demo, tiny) or a .py file's path, "
                                    "`:SWITCHES` after it (e.g. default:erm).", flag_values=flag_values,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and logs.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags(FLAGS)


def main(argv: list[str]) -> int:
    """Train a classifier with GERNE, ERM or a baseline into a workdir (checkpoints, metrics, logs)."""
    argv = with_config_paths(argv)
    if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv):
        print(help_text(argv))
        return 0
    # ml_collections finds the `--config.KEY=VALUE` overrides in sys.argv itself, whoever called `main`.
    sys.argv = [PROG, *argv]
    app.run(_train, argv=sys.argv, flags_parser=cli.parse_config_flags)
    return 0  # app.run exits itself


def parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) of a command line, without training: a bad flag, switch or key raises InputError.

    Parsed on flags of its own, so that it can be called again with other overrides.
    """
    argv = [PROG, *with_config_paths(argv)]
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    with _sys_argv(argv):  # where ml_collections reads the overrides
        cli.parse_config_flags(argv, flag_values)
    return flag_values.config, flag_values.workdir


@contextlib.contextmanager
def _sys_argv(argv: list[str]) -> Iterator[None]:
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


def _train(argv: list[str]) -> None:
    del argv
    from gerne_jax.core import distributed
    from gerne_jax.methods import registry

    mesh = FLAGS.config.mesh  # several processes: docs/scaling.md
    distributed.initialize(mesh.distributed, mesh.coordinator_address, mesh.num_processes, mesh.process_id)
    cli.setup_logging(main_process=distributed.is_main_process())
    # A run saved before a key existed resumes while the key keeps default.py's value (run_log.check_config).
    defaults = _load_config(str(config_names()["default"]))
    registry.train(FLAGS.config, FLAGS.workdir, defaults)  # SIGTERM: saved, status 143 (cli.run_command)


def config_names() -> dict[str, pathlib.Path]:
    """The package's configs: {name: path of its .py file}."""
    package = importlib.resources.files(CONFIG_PACKAGE)
    return {entry.name[:-3]: pathlib.Path(str(entry)) for entry in sorted(package.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".py") and not entry.name.startswith("_")}


def config_path(spec: str) -> str:
    """`NAME[:SWITCHES]` -> `PATH[:SWITCHES]` for a config of the package; a path is returned as it is."""
    name, colon, switches = spec.partition(":")
    if name.endswith(".py") or "/" in name or "\\" in name or pathlib.Path(name).is_file():
        return spec
    configs = config_names()
    if name not in configs:
        raise InputError(f"unknown config {name!r} (--config={spec}); name one of {', '.join(configs)} "
                         "or give the path of a .py file with get_config(arg)")
    return f"{configs[name]}{colon}{switches}"


def with_config_paths(argv: list[str]) -> list[str]:
    """`argv` with a `--config NAME[:SWITCHES]` given by name turned into the config file's path."""
    resolved = list(argv)
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=|$)", arg)
        if match and match.group(1):
            resolved[i] = f"{arg.split('=', 1)[0]}={config_path(arg.split('=', 1)[1])}"
        elif match and i + 1 < len(argv):
            resolved[i + 1] = config_path(argv[i + 1])
    return resolved


def help_text(argv: list[str]) -> str:
    """The usage, the configs and their switches, where the keys are; with `--config` given, its keys."""
    lines = [f"usage: {PROG} --config CONFIG[:SWITCHES] --workdir DIR [--config.KEY=VALUE ...]", "", __doc__.strip(),
             "", "configs (--config NAME[:SWITCHES]):"]
    configs = config_names()
    width = max(map(len, configs))
    for name, path in configs.items():
        lines.append(f"  {name:<{width}}  {_first_line(path)}")
    from gerne_jax.methods import registry  # the method names alone: no JAX

    methods = (*registry.names(), "resample")  # resample: the configs' switch for GERNE with c = 1, beta = 0
    lines += ["", f"switches: method={' | '.join(methods)} (default gerne), written bare (default:erm);",
              "  default and tiny also take model=resnet18|resnet34|resnet50|resnet101|resnet152|tiny "
              "(default:erm,model=resnet18);",
              "  demo adds erm_scoring and gerne_pseudo (docs/methods.md).",
              "config keys: docs/configs.md lists every key, its default and meaning; "
              f"`{PROG} --config NAME[:SWITCHES] --help` prints that config's keys and values.",
              "", "flags:",
              "  --config CONFIG[:SWITCHES]  a config by name or a .py file's path",
              "  --workdir DIR               checkpoints, metrics.jsonl, logs; rerun the same command to resume",
              "  --config.KEY=VALUE          change one key (repeat for several)"]
    spec = cli.config_spec(argv)
    if spec is not None:
        lines += ["", f"keys of --config={spec}:", str(_load_config(spec))]
    return "\n".join(lines)


def _first_line(path: pathlib.Path) -> str:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    return docstring.splitlines()[0] if docstring else ""


def _load_config(spec: str) -> ml_collections.ConfigDict:
    path, _, switches = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_gerne_jax_help_config", path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"config file {path} cannot be loaded (--config={spec})")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(switches or None)
