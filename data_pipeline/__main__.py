"""`python -m data_pipeline {synthetic,tile,stats} ...`: the commands of `data_pipeline.commands`."""
from __future__ import annotations

import sys

from data_pipeline.commands import main
from gerne_jax.core.cli import run_command

if __name__ == "__main__":
    run_command(lambda: main(sys.argv[1:]))
