"""GERNE with unknown attributes (ICCV GERNE paper, section 4.2): pseudo-groups from a scoring ERM run.

When the spurious attribute of the training examples is unknown, an ERM run (the scoring run: the
ERM config with learning rate / 10 and weight decay x 2, selected on validation BCA) scores every
training example by its true-class probability `p_true`. Within each class y, the
`n_min(y) = rint(t * n_y)` examples with the lowest `p_true` (t = `method.pseudo_groups.fraction`;
`rint` rounds half to even, like Python's `round`; ties in `p_true` go to the lower index, a stable
sort) form the pseudo-minority, attribute 1, and the others the pseudo-majority, attribute 0. GERNE's
Algorithm 1 (`groups.make_batch_plan`, the paired sampler) then runs on these two pseudo-groups per
class, on the training split only: validation and test keep the true tissue-ratio groups of
`data.taus` for the metrics and checkpoint selection.

How well the pseudo-minority finds the true minority is reported per class and overall: precision
(the share of the pseudo-minority that is truly minority) and recall (the share of the true minority
that is in the pseudo-minority). The true minority of a class is every training example outside the
class's majority tissue-ratio bin (its bin with the most examples at `data.taus`; a tie goes to the
lower bin), so with one threshold it is the class's smaller bin.

Config (`method.pseudo_groups`, read by method `gerne`, also as resampling with c = 1, beta = 0):
`scoring_workdir` (non-empty switches pseudo-groups on), `scoring_checkpoint` (default best_bca) and
`fraction` (t, in (0, 1)).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core import files
from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset
from gerne_jax.methods import reference_run

BIN_NAMES = ("pseudo-majority", "pseudo-minority")
MAJORITY, MINORITY = 0, 1
REPORT_FILE = "pseudo_groups.json"


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains on pseudo-groups (`method.pseudo_groups.scoring_workdir` is set)."""
    return bool(config.method.pseudo_groups.scoring_workdir)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses (ConfigError naming the key) a pseudo-group config that cannot run (the registry refuses
    pseudo-groups for methods other than GERNE)."""
    fraction = config.method.pseudo_groups.fraction
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"config method.pseudo_groups.fraction = {fraction!r} must lie in (0, 1) (t: the share "
                          "of each class with the lowest true-class probability that forms its pseudo-minority)")


def true_class_probability(probabilities: np.ndarray, label: np.ndarray) -> np.ndarray:
    """`p_true[i] = probabilities[i, label[i]]`, from class probabilities `[M, K]`."""
    probabilities, label = np.asarray(probabilities), np.asarray(label)
    return np.take_along_axis(probabilities, label[:, None].astype(np.int64), axis=1)[:, 0]


def minority_sizes(label: np.ndarray, fraction: float, num_classes: int) -> np.ndarray:
    """`rint(t * n_y)` per class, int64 `[K]` (half to even)."""
    return np.rint(fraction * np.bincount(np.asarray(label), minlength=num_classes)).astype(np.int64)


def pseudo_attribute(p_true: np.ndarray, label: np.ndarray, fraction: float, num_classes: int) -> np.ndarray:
    """Pseudo attribute `[M]` (int32): 1 for each class's `rint(t * n_y)` lowest-`p_true` examples, else 0.

    Ties in `p_true` go to the lower index (stable sort), so the result is deterministic.
    """
    p_true, label = np.asarray(p_true), np.asarray(label)
    if p_true.shape != label.shape or label.ndim != 1:
        raise ValueError(f"p_true {p_true.shape} and label {label.shape} must be two [M] arrays")
    attribute = np.full(label.shape, MAJORITY, np.int32)
    for y, size in enumerate(minority_sizes(label, fraction, num_classes)):
        members = np.flatnonzero(label == y)  # in index order, so the stable sort breaks ties by index
        attribute[members[np.argsort(p_true[members], kind="stable")[:size]]] = MINORITY
    return attribute


def true_minority(label: np.ndarray, attribute: np.ndarray, num_classes: int,
                  num_attributes: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether each example is outside its class's majority bin `[M]` (bool), and those bins `[K]`.

    A class's majority bin is the one with the most of its examples; a tie goes to the lower bin.
    """
    counts = dataset.group_counts(label, attribute, num_classes, num_attributes)
    majority_bins = np.argmax(counts, axis=1)
    return np.asarray(attribute) != majority_bins[np.asarray(label)], majority_bins


def precision_recall(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float | int]:
    """Precision and recall of the positives `predicted` against `actual` (bool `[M]`); NaN where undefined."""
    predicted, actual = np.asarray(predicted, bool), np.asarray(actual, bool)
    hits = int(np.sum(predicted & actual))
    num_predicted, num_actual = int(predicted.sum()), int(actual.sum())
    return {"examples": int(predicted.size), "pseudo_minority": num_predicted, "true_minority": num_actual,
            "both": hits, "precision": hits / num_predicted if num_predicted else float("nan"),
            "recall": hits / num_actual if num_actual else float("nan")}


@dataclasses.dataclass(frozen=True)
class PseudoGroups:
    """The pseudo attribute of every training example and how it matches the true groups."""

    attribute: np.ndarray   # [M] int32, MAJORITY or MINORITY
    report: dict[str, Any]  # written to REPORT_FILE; see `make`

    def describe(self) -> str:
        """The rule and a precision/recall table per class and overall."""
        r = self.report
        rows = [*r["per_class"].items(), ("all", r["overall"])]
        width = max(len(name) for name, _ in rows) + 2
        lines = [f"Pseudo-groups: per class, the fraction t = {r['fraction']:g} of training examples with the lowest "
                 f"true-class probability under {r['scoring_workdir']} {r['scoring_checkpoint']} (step "
                 f"{r['scoring_step']}) form the pseudo-minority. Against the true minority,\n"
                 f"{r['true_minority_definition']}:",
                 "class".ljust(width) + "examples  pseudo-minority  true minority  precision  recall"]
        for name, row in rows:
            lines.append(f"{name:<{width}}{row['examples']:>8}{row['pseudo_minority']:>17}{row['true_minority']:>15}"
                         f"{row['precision']:>11.3f}{row['recall']:>8.3f}")
        return "\n".join(lines)


def make(probabilities: np.ndarray, label: np.ndarray, true_attribute: np.ndarray, *, fraction: float,
         true_bin_names: Sequence[str], source: dict[str, Any],
         class_names: Sequence[str] = dataset.CLASS_NAMES) -> PseudoGroups:
    """Pseudo-groups from the scoring run's class probabilities `[M, K]` on the training split.

    `true_attribute` (the bins `true_bin_names`) is used for the report only. `source` (the scoring
    run's `scoring_workdir`, `scoring_checkpoint` and `scoring_step`) goes into the report. Raises ConfigError naming
    `method.pseudo_groups.fraction` when it leaves a class's pseudo-minority or pseudo-majority empty.
    """
    num_classes = len(class_names)
    label = np.asarray(label)
    sizes = minority_sizes(label, fraction, num_classes)
    class_sizes = np.bincount(label, minlength=num_classes)
    for y, (size, total) in enumerate(zip(sizes, class_sizes)):
        if not 0 < size < total:
            raise ConfigError(f"config method.pseudo_groups.fraction = {fraction:g} makes a pseudo-minority of "
                              f"rint({fraction:g} * {total}) = {size} of the {total} training examples of class "
                              f"{class_names[y]}: both pseudo-groups need examples")
    attribute = pseudo_attribute(true_class_probability(probabilities, label), label, fraction, num_classes)
    actual, majority_bins = true_minority(label, true_attribute, num_classes, len(true_bin_names))
    predicted = attribute == MINORITY
    true_groups = dataset.group_ids(label, true_attribute, num_classes, len(true_bin_names))
    shares = {}
    for y in range(num_classes):
        for a, bin_name in enumerate(true_bin_names):
            members = true_groups == y * len(true_bin_names) + a
            shares[f"({class_names[y]}, {bin_name})"] = float(predicted[members].mean()) if members.any() else None
    report = {
        **source, "fraction": float(fraction),
        "true_minority_definition": "bins other than each class's majority bin: " + ", ".join(
            f"{class_names[y]} outside {true_bin_names[b]}" for y, b in enumerate(majority_bins)),
        "per_class": {class_names[y]: precision_recall(predicted[label == y], actual[label == y])
                      for y in range(num_classes)},
        "overall": precision_recall(predicted, actual),
        "pseudo_minority_share_by_true_group": shares,
    }
    return PseudoGroups(attribute=attribute, report=report)


def from_scoring_run(config: ml_collections.ConfigDict, train: dict[str, Any], metadata: dict[str, Any],
                     mesh: Mesh, true_attribute: np.ndarray) -> PseudoGroups:
    """The pseudo-groups of this run's training split under the configured scoring run's checkpoint.

    Raises ConfigError naming the `method.pseudo_groups` key at fault.
    """
    check_config(config)
    settings = config.method.pseudo_groups
    keys = {"workdir_key": "method.pseudo_groups.scoring_workdir",
            "checkpoint_key": "method.pseudo_groups.scoring_checkpoint"}
    probabilities = reference_run.training_probabilities(
        config, train, metadata, mesh, workdir=settings.scoring_workdir, checkpoint=settings.scoring_checkpoint,
        expected_run="a finished ERM scoring run on the same data (the ERM config with learning rate / 10 and "
                     "weight decay x 2)", **keys)
    step = reference_run.checkpoint_step(settings.scoring_workdir, settings.scoring_checkpoint, keys["checkpoint_key"])
    source = {"scoring_workdir": str(settings.scoring_workdir),
              "scoring_checkpoint": str(settings.scoring_checkpoint), "scoring_step": step}
    return make(probabilities, train["label"], true_attribute, fraction=settings.fraction,
                true_bin_names=dataset.tissue_bin_names(config.data.taus), source=source)


def write_report(workdir: str | pathlib.Path, groups: PseudoGroups) -> None:
    """Writes the report to `workdir/pseudo_groups.json` (whole or not at all)."""
    files.write_text_atomic(pathlib.Path(workdir) / REPORT_FILE, json.dumps(groups.report, indent=2, allow_nan=True))
