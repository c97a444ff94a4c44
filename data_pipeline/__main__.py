"""Command line of the data pipeline: `python -m data_pipeline {synthetic,tile,stats} ...`.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`.
Known failures (a broken slide, a bad manifest or option, a missing dataset) raise an `InputError`
naming what is wrong; `gerne_jax.cli.run_command` prints it as one line and exits with status 2, so
every subcommand answers bad input alike. `main` itself lets them propagate for callers and tests.
"""
from __future__ import annotations

import argparse
import importlib

from gerne_jax.cli import run_command

SUBCOMMANDS = {
    "synthetic": ("data_pipeline.synthetic", "Write built-in synthetic multimodal slides and a manifest."),
    "tile": ("data_pipeline.tile_manifest", "Tile the slides of a manifest into TFDS patch shards."),
    "stats": ("data_pipeline.stats", "Group counts per split and tau; tissue-ratio distribution plot."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    run_command(main)
