"""`gerne-jax evaluate` from a checkout: `python evaluate.py --workdir runs/gerne [--split test]`.

The command is `gerne_jax.commands.evaluate` (`python evaluate.py --help`).
"""
from gerne_jax.commands.evaluate import main
from gerne_jax.core import cli

if __name__ == "__main__":
    cli.run_command(main)
