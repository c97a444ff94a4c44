"""Text tables and PNG plots of evaluation reports (`metrics.classification_report` dicts)."""
from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from gerne_jax.core import files
from gerne_jax.data.dataset import CLASS_NAMES

SUMMARY_METRICS = (("WGA", "worst_group_accuracy"), ("GBA", "group_balanced_accuracy"),
                   ("BCA", "balanced_class_accuracy"), ("avg acc", "average_accuracy"),
                   ("worst class", "worst_class_accuracy"), ("AUROC", "auroc"))


def group_table(report: Mapping[str, Any], class_names: Sequence[str] = CLASS_NAMES) -> str:
    """One row per group (class, tissue bin): count and accuracy; then the summary metrics."""
    lines = [f"{'class':<12}{'tissue bin':<22}{'count':>8}{'accuracy':>10}"]
    for y, (counts, accuracies) in enumerate(zip(report["group_count"], report["group_accuracy"])):
        for bin_name, count, accuracy in zip(report["bin_names"], counts, accuracies):
            shown = "-" if count == 0 else f"{accuracy:.4f}"
            lines.append(f"{class_names[y]:<12}{bin_name:<22}{count:>8}{shown:>10}")
    lines.append("  ".join(f"{short} {report[key]:.4f}" for short, key in SUMMARY_METRICS))
    return "\n".join(lines)


def comparison_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Runs side by side: one row per run, one column per summary metric."""
    width = max(12, *(len(name) for name in reports)) + 2
    lines = ["run".ljust(width) + "".join(f"{short:>12}" for short, _ in SUMMARY_METRICS)]
    for name, report in reports.items():
        lines.append(name.ljust(width) + "".join(f"{report[key]:>12.4f}" for _, key in SUMMARY_METRICS))
    return "\n".join(lines)


def error_rate_by_tissue_ratio(label: np.ndarray, probabilities: np.ndarray, tissue_ratio: np.ndarray,
                               num_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the error rate in equal-width tissue-ratio bins over [0, 1].

    Returns the bin edges [num_bins + 1], counts [K, num_bins] and error rates [K, num_bins] (NaN
    where a bin is empty).
    """
    label = np.asarray(label)
    errors = np.asarray(probabilities).argmax(axis=1) != label
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.digitize(tissue_ratio, edges[1:-1]), 0, num_bins - 1)
    num_classes = np.asarray(probabilities).shape[1]
    counts = np.zeros((num_classes, num_bins), np.int64)
    wrong = np.zeros((num_classes, num_bins), np.int64)
    np.add.at(counts, (label, bins), 1)
    np.add.at(wrong, (label, bins), errors.astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, wrong / np.maximum(counts, 1), np.nan)
    return edges, counts, rates


def binomial_interval(wrong: np.ndarray, count: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson (exact) interval of an error rate `wrong / count` per bin; NaN where `count` is 0.

    Exact rather than normal-approximate: the bins that matter (little tissue, the minority groups) hold
    few patches, where a normal interval leaves [0, 1] and undercovers.
    """
    wrong, count = np.asarray(wrong, np.int64), np.asarray(count, np.int64)
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore"):
        low = np.where(wrong > 0, stats.beta.ppf(alpha / 2, wrong, count - wrong + 1), 0.0)
        high = np.where(wrong < count, stats.beta.ppf(1 - alpha / 2, wrong + 1, count - wrong), 1.0)
    empty = count == 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def plot_error_by_tissue_ratio(runs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                               path: str | pathlib.Path, taus: Sequence[float] = (),
                               class_names: Sequence[str] = CLASS_NAMES) -> None:
    """The papers' first experiment: error rate against tissue ratio, one panel per class, with each bin's
    95 % Clopper-Pearson interval (`binomial_interval`) and its patch count, so a bin of two patches does
    not read as a finding.

    `runs` maps a run name to (label, probabilities, tissue_ratio) of the same split.
    """
    # The legend goes under the panels, where many runs' long names do not cover the curves.
    legend_rows = -(-len(runs) // 2)
    legend_height = 0.22 * legend_rows
    fig, axes = files.new_figure(1, len(class_names), figsize=(5 * len(class_names), 3.8 + legend_height),
                             sharey=True)
    offsets = (np.arange(len(runs)) - (len(runs) - 1) / 2) * 0.012  # runs side by side within a bin
    counts_shown = None
    for offset, (name, (label, probabilities, tissue_ratio)) in zip(offsets, runs.items()):
        edges, counts, rates = error_rate_by_tissue_ratio(label, probabilities, tissue_ratio)
        low, high = binomial_interval(np.rint(np.nan_to_num(rates) * counts), counts)
        centres = (edges[:-1] + edges[1:]) / 2 + offset
        for y, axis in enumerate(axes):
            line, = axis.plot(centres, rates[y], marker="o", label=name)
            axis.errorbar(centres, rates[y], yerr=np.abs(np.stack([rates[y] - low[y], high[y] - rates[y]])),
                          fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=2, alpha=0.6)
        counts_shown = counts_shown if counts_shown is not None else (edges, counts)
    if counts_shown is not None:  # the runs of one split share their patches: one count per bin
        edges, counts = counts_shown
        for y, axis in enumerate(axes):
            for centre, count in zip((edges[:-1] + edges[1:]) / 2, counts[y]):
                axis.annotate(f"n={count}", (centre, 1.12), xytext=(0, -2), textcoords="offset points",
                              ha="center", va="top", fontsize=6, color="dimgrey", rotation=90)
    for y, axis in enumerate(axes):
        for tau in taus:
            axis.axvline(tau, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"class {class_names[y]}")
        axis.set_xlabel("tissue ratio of the patch")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.12)  # room for the counts above the curves
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("error rate (95 % interval)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (legend_height + 0.05) / (3.8 + legend_height), 1, 1))
    files.save_figure(fig, path)


def plot_group_accuracy(reports: Mapping[str, Mapping[str, Any]], path: str | pathlib.Path,
                        class_names: Sequence[str] = CLASS_NAMES) -> None:
    """Per-group accuracy bars, one bar per run in each group, group counts under the labels."""
    first = next(iter(reports.values()))
    group_labels = [f"{class_names[y]}\n{bin_name}\nn={count}"
                    for y, counts in enumerate(first["group_count"])
                    for bin_name, count in zip(first["bin_names"], counts)]
    positions = np.arange(len(group_labels))
    width = 0.8 / len(reports)
    fig, axis = files.new_figure(figsize=(max(6.0, 1.6 * len(group_labels)), 4.2))
    for i, (name, report) in enumerate(reports.items()):
        accuracies = np.asarray(report["group_accuracy"], dtype=float).ravel()
        axis.bar(positions + (i - (len(reports) - 1) / 2) * width, np.nan_to_num(accuracies), width,
                 label=f"{name} (WGA {report['worst_group_accuracy']:.3f})")
    axis.set_xticks(positions, group_labels, fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path)
