"""Evaluation: class probabilities of a whole split and the per-tau reports of docs/design.md §5.

Groups are computed here, at evaluation time, from each example's tissue ratio, so a checkpoint can be
evaluated for any tau without retraining. One `Evaluator` serves the training loop (validation) and
`evaluate.py` (any split, any checkpoint, through `evaluate_run`); it predicts with `forward`'s function,
as whole-slide prediction does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gerne_jax.core import files
from gerne_jax.data import dataset, normalisation
from gerne_jax.evaluation import forward, metrics, reports
from gerne_jax.models import resnet
from gerne_jax.runs import run as run_lib

Report = dict[str, Any]


def tau_key(taus: Sequence[float]) -> str:
    return "tau=" + "+".join(f"{t:g}" for t in taus)


def report_per_tau(probabilities: np.ndarray, label: np.ndarray, tissue_ratio: np.ndarray,
                   taus_list: Sequence[Sequence[float]]) -> dict[str, Report]:
    """`metrics.classification_report` for each tuple of thresholds, keyed like `"tau=0.1"`."""
    reports_by_tau = {}
    for taus in taus_list:
        taus = tuple(float(t) for t in taus)
        attribute = dataset.attribute_from_tissue_ratio(tissue_ratio, taus)
        report = metrics.classification_report(label, probabilities, attribute, num_attributes=len(taus) + 1)
        report["bin_names"] = list(dataset.tissue_bin_names(taus))
        reports_by_tau[tau_key(taus)] = report
    return reports_by_tau


def scalar_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's scalars plus one `group_accuracy/<class>, <bin>` entry per non-empty group."""
    scalars = {key: float(value) for key, value in report.items() if np.ndim(value) == 0
               and isinstance(value, (int, float, np.number))}
    for y, (counts, accuracies) in enumerate(zip(report["group_count"], report["group_accuracy"])):
        for bin_name, count, accuracy in zip(report["bin_names"], counts, accuracies):
            if count:
                scalars[f"group_accuracy/{dataset.CLASS_NAMES[y]}, {bin_name}"] = float(accuracy)
    return scalars


class Evaluator:
    """Predicts every example of one split and reports the metrics for each tuple of thresholds.

    Args:
      split: `input_pipeline.load_split` output (images, labels, tissue ratios).
      model: the network; `predict` and `run` take its variables.
      taus_list: one report per tuple of thresholds (`[(0.1,), (0.03, 0.1)]`).
      batch_size: global evaluation batch size.
      mesh: the devices; batches are sharded over them.
      standardise: the training DATA_DIR's normalisation (`Standardiser.of` its metadata, as the run stored it).
      name: shown on the progress bar.
    """

    def __init__(self, split: Mapping[str, Any], model: resnet.ResNet, *, taus_list: Sequence[Sequence[float]],
                 batch_size: int, mesh: Mesh, standardise: normalisation.Standardiser, name: str = "evaluating"):
        self.split = split
        self.taus_list = [tuple(taus) for taus in taus_list]
        self.batch_size = batch_size
        self._predictor = forward.BatchPredictor(model, standardise, mesh, batch_size)
        self.name = name

    def predict(self, variables: Mapping[str, Any], output: forward.Forward = forward.probabilities) -> np.ndarray:
        """Class probabilities `[M, K]` of every example for the model's `variables` (`{"params",
        "batch_stats"}`), in index order (or the rows of `output`, e.g. `forward.embeddings`)."""
        from gerne_jax.data import input_pipeline  # TensorFlow: loaded only to read a split (not by predict.py)

        batches = input_pipeline.eval_dataset(self.split["image"], batch_size=self.batch_size)
        num_examples = len(self.split["label"])
        outputs = []
        for batch in tqdm.tqdm(batches.as_numpy_iterator(), total=-(-num_examples // self.batch_size),
                               desc=self.name, leave=False, unit="batch",
                               disable=jax.process_index() != 0):
            result = self._predictor(variables, batch["image"], output)
            outputs.append(np.asarray(multihost_utils.process_allgather(result, tiled=True)))
        # Global batches in index order; the padding sits at the very end.
        return np.concatenate(outputs)[:num_examples]

    def report(self, probabilities: np.ndarray) -> dict[str, Report]:
        return report_per_tau(probabilities, self.split["label"], self.split["tissue_ratio"], self.taus_list)

    def run(self, variables: Mapping[str, Any]) -> dict[str, Report]:
        return self.report(self.predict(variables))


@dataclasses.dataclass
class RunEvaluation:
    """A run's checkpoint evaluated on one split."""

    workdir: pathlib.Path
    checkpoint: str
    checkpoint_meta: dict[str, Any]   # step, config, the validation metrics it was chosen on
    split_name: str
    split: Mapping[str, Any]
    probabilities: np.ndarray
    taus_list: list[tuple[float, ...]]
    reports: dict[str, Report]        # tau key -> report


def evaluate_run(workdir: str | os.PathLike, checkpoint: str = "best_wga", split_name: str = "test", *,
                 data_dir: str | None = None, taus_list: Sequence[Sequence[float]] | None = None,
                 split_cache: dict[str, Any] | None = None) -> RunEvaluation:
    """Restores a run's checkpoint (its network only: `run.Run.restore_model`) and evaluates it on a split
    of its DATA_DIR (or `data_dir`).

    The patches come from that DATA_DIR; their normalisation is the run's own, the channel mean and std
    of its data spec (`run_log.read_data_spec`; the same numbers as the DATA_DIR's it was trained on).
    `taus_list` defaults to the run's own thresholds. `split_cache` (a dict kept by the caller) lets
    several runs on the same data load the split once.
    """
    opened = run_lib.Run.open(workdir, data_dir=data_dir)
    data_dir = str(opened.data_dir)
    split_cache = {} if split_cache is None else split_cache
    if (data_dir, split_name) not in split_cache:
        from gerne_jax.data import input_pipeline

        split_cache[data_dir, split_name] = input_pipeline.load_split(data_dir, split_name,
                                                                      in_memory=opened.config.data.in_memory)
    split = split_cache[data_dir, split_name]
    restored, meta = opened.restore_model(checkpoint, tuple(split["image"].shape[1:]), data_dir)
    evaluator = Evaluator(split, restored.module, taus_list=taus_list or [tuple(opened.config.data.taus)],
                          batch_size=opened.config.data.eval_batch_size, mesh=opened.mesh,
                          standardise=normalisation.Standardiser.of(opened.metadata, opened.mesh,
                                                                    num_channels=split["image"].shape[-1]),
                          name=f"{opened.workdir.name} {split_name}")
    probabilities = evaluator.predict(restored.variables)
    return RunEvaluation(workdir=opened.workdir, checkpoint=checkpoint, checkpoint_meta=meta, split_name=split_name,
                         split=split, probabilities=probabilities, taus_list=evaluator.taus_list,
                         reports=evaluator.report(probabilities))


def run_names(workdirs: Sequence[str | os.PathLike]) -> list[str]:
    """Short distinct names of runs: their folder names, or whole paths where those clash."""
    paths = [pathlib.Path(w) for w in workdirs]
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def write_results(evaluations: Mapping[str, RunEvaluation], out: str | os.PathLike,
                  keyed_by_run: bool = True) -> pathlib.Path:
    """Writes `<checkpoint>_<split>.json` and the PNGs into `out`; returns the JSON's path.

    The JSON maps run names to their results (`keyed_by_run`) or, for one run, is its results. PNGs:
    per-group accuracies of every run per tau, and the error rate against tissue ratio.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(evaluations.values()))
    stem = f"{first.checkpoint}_{first.split_name}"
    for key in first.reports:
        reports.plot_group_accuracy({name: e.reports[key] for name, e in evaluations.items()},
                                    out / f"{stem}_groups_{key}.png")
    taus = sorted({t for e in evaluations.values() for taus in e.taus_list for t in taus})
    reports.plot_error_by_tissue_ratio(
        {name: (e.split["label"], e.probabilities, e.split["tissue_ratio"]) for name, e in evaluations.items()},
        out / f"{stem}_error_vs_tissue_ratio.png", taus=taus)
    document = {name: {"workdir": str(e.workdir), "checkpoint": e.checkpoint,
                       "checkpoint_step": e.checkpoint_meta["step"],
                       "selected_on_validation": e.checkpoint_meta["metrics"],
                       "split": e.split_name, "results": e.reports}
                for name, e in evaluations.items()}
    if not keyed_by_run:
        (document,) = document.values()
    path = out / f"{stem}.json"
    files.write_text_atomic(path, json.dumps(document, indent=2, allow_nan=True))
    return path
