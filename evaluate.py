"""`gerne-jax evaluate` from a checkout: `python evaluate.py --workdir runs/gerne [--split test]`.

The command is `gerne_jax.commands.evaluate` (`python evaluate.py --help`).
"""
from gerne_jax import cli
from gerne_jax.commands.evaluate import main

if __name__ == "__main__":
    cli.run_command(main)
