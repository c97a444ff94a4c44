"""Classification metrics per group (docs/design.md §5), in plain numpy.

A group is the pair (class y, attribute bin a). With per-example predictions these functions give
per-group counts and accuracies and the summaries used for model selection:

- worst-group accuracy (WGA): the minimum accuracy over non-empty groups;
- group-balanced accuracy (GBA): the unweighted mean of the non-empty groups' accuracies;
- balanced class accuracy (BCA): the unweighted mean of per-class recalls
  (scikit-learn's `balanced_accuracy_score`);
- average accuracy, worst-class accuracy, and AUROC of the tumour score (binary tasks).

Empty groups are reported with count 0 and accuracy NaN and are left out of WGA and GBA.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def per_group_accuracy(
    labels: np.ndarray, predictions: np.ndarray, attributes: np.ndarray,
    num_classes: int, num_attributes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts and accuracies of each (class, attribute) group, both shaped [num_classes, num_attributes]."""
    labels, predictions, attributes = (np.asarray(v).astype(np.int64).ravel()
                                       for v in (labels, predictions, attributes))
    if not labels.shape == predictions.shape == attributes.shape:
        raise ValueError(f"labels, predictions and attributes differ in length: "
                         f"{labels.shape[0]}, {predictions.shape[0]}, {attributes.shape[0]}")
    for name, values, bound in (("label", labels, num_classes), ("attribute", attributes, num_attributes)):
        if values.size and (values.min() < 0 or values.max() >= bound):
            raise ValueError(f"{name} values must lie in [0, {bound}); got {values.min()}..{values.max()}")
    flat_group = labels * num_attributes + attributes
    size = num_classes * num_attributes
    counts = np.bincount(flat_group, minlength=size)
    correct = np.bincount(flat_group, weights=(labels == predictions), minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    return counts.reshape(num_classes, num_attributes), accuracy.reshape(num_classes, num_attributes)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the positive class 1, ties counted as half.

    This is the Mann-Whitney U statistic divided by (#positives * #negatives): the probability that a
    random positive scores higher than a random negative. NaN when either class is absent.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty_like(sorted_scores)
    # Average rank (1-based) within each block of tied scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], sorted_scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def classification_report(
    labels: np.ndarray, probabilities: np.ndarray, attributes: np.ndarray, num_attributes: int,
) -> dict[str, Any]:
    """All docs/design.md §5 metrics from class probabilities [N, K] and attribute bins [N].

    Returns a JSON-friendly dict: the scalar metrics, `class_accuracy` [K] and `group_count` /
    `group_accuracy` [K][A] (NaN for empty groups).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be [N, num_classes]; got shape {probabilities.shape}")
    labels = np.asarray(labels).astype(np.int64).ravel()
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    counts, accuracy = per_group_accuracy(labels, predictions, attributes, num_classes, num_attributes)
    class_counts = counts.sum(axis=1)
    class_correct = np.nansum(np.where(counts > 0, accuracy * counts, 0.0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        class_accuracy = np.where(class_counts > 0, class_correct / np.maximum(class_counts, 1), np.nan)
    non_empty = counts > 0
    report = {
        "num_examples": int(labels.size),
        "average_accuracy": float((predictions == labels).mean()) if labels.size else float("nan"),
        "balanced_class_accuracy": float(np.nanmean(class_accuracy)),
        "worst_class_accuracy": float(np.nanmin(class_accuracy)),
        "worst_group_accuracy": float(accuracy[non_empty].min()) if non_empty.any() else float("nan"),
        "group_balanced_accuracy": float(accuracy[non_empty].mean()) if non_empty.any() else float("nan"),
        "auroc": auroc(labels == 1, probabilities[:, 1]) if num_classes == 2 else float("nan"),
        "class_accuracy": class_accuracy.tolist(),
        "group_count": counts.tolist(),
        "group_accuracy": accuracy.tolist(),
    }
    return report
