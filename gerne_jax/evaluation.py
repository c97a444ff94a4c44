"""Evaluators: class probabilities of a whole split, and SPEC section 4 metrics per tau.

Groups are computed here, at evaluation time, from each example's tissue ratio (or any integer
attribute), so a checkpoint can be evaluated for any tau without retraining.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm
from jax.sharding import Mesh

from gerne_jax import groups, input_pipeline, metrics, train_step


def make_predict_fn(mesh: Mesh) -> Callable[[Any, Mapping[str, np.ndarray]], np.ndarray]:
    """`predict(state, batch) -> probabilities [n, K]` of a process-local eval batch, sharded on N."""

    @jax.jit
    def probabilities(state, images):
        return jax.nn.softmax(train_step.eval_step(state, images).astype(np.float32), axis=-1)

    def predict(state, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        images = train_step.shard_batch({"image": batch["image"]}, mesh, batch_axis=0)["image"]
        return np.asarray(multihost_utils.process_allgather(
            probabilities(state, images), tiled=True))

    return predict


def predict_split(state: Any, split: Mapping[str, Any], *, predict: Callable, batch_size: int,
                  channel_mean: Sequence[float], channel_std: Sequence[float],
                  desc: str = "evaluating") -> np.ndarray:
    """Class probabilities `[M, K]` of every example of a split (`input_pipeline.load_split` output)."""
    dataset = input_pipeline.eval_dataset(split["image"], split["label"], batch_size=batch_size,
                                          channel_mean=channel_mean, channel_std=channel_std)
    num_examples = len(split["label"])
    outputs: list[np.ndarray] = []
    batches: Iterator = dataset.as_numpy_iterator()
    for batch in tqdm.tqdm(batches, total=-(-num_examples // batch_size), desc=desc, leave=False,
                           unit="batch"):
        outputs.append(predict(state, batch))
    # Global batches in index order; padding sits at the very end.
    return np.concatenate(outputs)[:num_examples]


def report_per_tau(probabilities: np.ndarray, label: np.ndarray, tissue_ratio: np.ndarray,
                   taus_list: Sequence[Sequence[float]]) -> dict[str, dict[str, Any]]:
    """`metrics.classification_report` for each tuple of thresholds, keyed like `"tau=0.1"`."""
    reports = {}
    for taus in taus_list:
        taus = tuple(float(t) for t in taus)
        attribute = groups.attribute_from_tissue_ratio(tissue_ratio, taus)
        report = metrics.classification_report(label, probabilities, attribute, num_attributes=len(taus) + 1)
        report["bin_names"] = list(groups.tissue_bin_names(taus))
        reports[tau_key(taus)] = report
    return reports


def tau_key(taus: Sequence[float]) -> str:
    return "tau=" + "+".join(f"{t:g}" for t in taus)


def scalar_metrics(report: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, float]:
    """The report's scalars plus one `group_accuracy/<class>, <bin>` entry per non-empty group."""
    scalars = {key: float(value) for key, value in report.items() if np.ndim(value) == 0
               and isinstance(value, (int, float, np.number))}
    for y, (counts, accuracies) in enumerate(zip(report["group_count"], report["group_accuracy"])):
        for bin_name, count, accuracy in zip(report["bin_names"], counts, accuracies):
            if count:
                scalars[f"group_accuracy/{class_names[y]}, {bin_name}"] = float(accuracy)
    return scalars
