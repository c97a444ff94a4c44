"""Trains a patch-wise tumour classifier with GERNE or ERM (docs/design.md §3).

  python train.py --config configs/default.py:gerne --workdir runs/gerne [--config.method.beta=1.5]

The loop is `gerne_jax.trainer.train_and_evaluate` (what it writes, how it resumes). Bad input (a
mistyped flag, config switch or key, a value outside its range, a DATA_DIR that is not one, a workdir
another run is training in) is answered with one line `error: ...` and exit status 2, before anything
is written into the workdir.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gerne_jax import cli, distributed, trainer  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (`:arg` for its switches).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    mesh = FLAGS.config.mesh  # several processes: README "Multi-host training"
    distributed.initialize(mesh.distributed, mesh.coordinator_address, mesh.num_processes, mesh.process_id)
    cli.setup_logging(main_process=distributed.is_main_process())
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # SIGTERM: saved, status 143 (cli.run_command)


if __name__ == "__main__":
    cli.run_command(lambda: app.run(main, flags_parser=cli.parse_config_flags))
