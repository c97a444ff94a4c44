"""The commands of the `gerne-jax` console tool that train and use a model: `train`, `evaluate`, `predict`.

Each module is one command: its docstring's first line is the command's summary and `main(argv)` runs
it. The modules import only what parsing needs, and the JAX side after parsing, so that `--help` and a
mistyped flag answer at once.
"""
