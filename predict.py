"""`gerne-jax predict` from a checkout: `python predict.py --workdir RUN --manifest SLIDES.csv --out OUT`.

The command is `gerne_jax.commands.predict` (`python predict.py --help`).
"""
from gerne_jax.commands.predict import main
from gerne_jax.core import cli

if __name__ == "__main__":
    cli.run_command(main)
