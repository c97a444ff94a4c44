"""`gerne-jax train` from a checkout: `python train.py --config configs/default.py:gerne --workdir runs/gerne`.

The command is `gerne_jax.commands.train` (`python train.py --help`).
"""
import sys

from gerne_jax.commands import train
from gerne_jax.core import cli

if __name__ == "__main__":
    cli.run_command(lambda: train.main(sys.argv[1:]))
