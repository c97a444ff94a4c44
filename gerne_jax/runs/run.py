"""A trained run read back from its workdir: its config, its data spec, its mesh and its checkpoints' models.

Evaluation (`evaluate.evaluate_run`), prediction (`inference.load_run`) and the methods that start from
another run (a reference run's predictions, DFR's base network) open a run with `Run.open` and take a
checkpoint's network with `Run.restore_model`: the Flax module of the run's `config.model` and only its
parameters and BatchNorm statistics, read from the checkpoint without its optimiser state (so without
building the training method's optimiser). Resuming a run restores its whole train state instead
(`checkpoints.RunCheckpoints.restore_for_resume`).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.models import factory, resnet
from gerne_jax.runs import checkpoints, run_log


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """A checkpoint's network: the module the run's `config.model` describes and its variables."""

    module: resnet.ResNet
    params: Any          # replicated on the run's mesh
    batch_stats: Any     # BatchNorm running statistics; {} for a GroupNorm model

    @property
    def variables(self) -> dict[str, Any]:
        """Flax's `{"params", "batch_stats"}` (`gerne_jax.evaluation.forward`'s input)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class Run:
    """The run in `workdir` (`Run.open`)."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    data_dir: pathlib.Path        # its DATA_DIR (`data.dir` or the override); read only for an old run
    data_spec: run_log.DataSpec   # what its model takes as input and how its data was tiled
    mesh: Mesh                    # the devices its models are placed on

    @classmethod
    def open(cls, workdir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             mesh: Mesh | None = None) -> Run:
        """The run in `workdir`; its data spec is the one it stored (`run_log.read_data_spec`).

        A run trained before runs stored their data spec has none: its DATA_DIR is read instead, as such a
        run always was (`data_dir` overrides the run's `data.dir`, e.g. after moving it; it is not read
        for a run with a data spec). `mesh` defaults to the run's `config.mesh`.
        """
        workdir = pathlib.Path(workdir)
        config = run_log.read_config(workdir)
        data_dir = pathlib.Path(data_dir or config.data.dir)
        # Old runs (no data_spec.json) keep working exactly as before: their DATA_DIR's current content.
        data_spec = run_log.read_data_spec(workdir) or run_log.data_spec_of(data_dir)
        return cls(workdir, config, data_dir, data_spec, mesh if mesh is not None else sharding.mesh_of(config.mesh))

    @property
    def metadata(self) -> dict[str, Any]:
        """The training DATA_DIR's metadata (code names), as the run stored it."""
        return self.data_spec.metadata

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """(P, P, C) of the patches the run's model takes."""
        size = int(self.metadata["patch_size"])
        return size, size, len(self.metadata["channel_names"])

    def restore_model(self, checkpoint: str | int, patch_shape: tuple[int, ...] | None = None,
                      data_source: str | os.PathLike | None = None) -> tuple[RestoredModel, dict[str, Any]]:
        """A checkpoint's (best_wga|best_bca|...|latest|STEP) network, replicated on the run's mesh, and the
        checkpoint's meta (step, config, the validation metrics it was chosen on).

        `patch_shape` (P, P, C) is that of the patches the model will be applied to and `data_source` where
        they are (a DATA_DIR), default the run's data spec's; a network of another shape is a
        CheckpointError naming them. Nothing is read from `data_source`.
        """
        patch_shape = tuple(patch_shape or self.patch_shape)
        data_source = data_source or self.data_spec.source
        module = factory.create_model(self.config.model)
        run_checkpoints = checkpoints.RunCheckpoints(self.workdir, read_only=True)
        try:
            variables, meta = run_checkpoints.restore_model(checkpoint,
                                                            _abstract_variables(module, patch_shape, self.mesh))
        except checkpoints.DamagedCheckpointError:
            raise
        except checkpoints.CheckpointError as error:  # variables shaped otherwise than this model and data
            if not run_checkpoints.has(checkpoint):
                raise
            raise checkpoints.CheckpointError(
                f"{error} (does the run's config match the data in {data_source}? patches there are "
                f"{patch_shape}, model {self.config.model.name})") from None
        finally:
            run_checkpoints.close()
        return RestoredModel(module, variables["params"], variables["batch_stats"]), meta


def _abstract_variables(module: resnet.ResNet, patch_shape: tuple[int, ...], mesh: Mesh) -> dict[str, Any]:
    """The shapes, dtypes and (replicated) shardings of `module`'s variables for patches of `patch_shape`.

    Tracing the initialisation is enough for a restore target: nothing is compiled or run.
    """
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *patch_shape), jnp.float32),
                                                   train=False))
    replicated = sharding.replicated_sharding(mesh)
    target = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), target)
