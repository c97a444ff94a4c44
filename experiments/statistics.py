"""Statistics of the comparison: paired differences over training seeds, and intervals over test slides.

Pure numpy and scipy, no JAX. The two sources of noise are kept apart: a paired difference over training
seeds (the same data, one network per seed and method) says whether a method's gain survives the
training randomness; the bootstrap over test slides says how much the figure moves with which slides
happen to be in the test split (patches of one slide are not independent, so slides are resampled).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BOOTSTRAP_REPLICATES = 2000


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> dict[str, float]:
    """Per-seed differences `values - reference` (paired by seed): their mean, sample standard deviation,
    Student-t interval of the mean and the two-sided p-value of "mean difference = 0"."""
    differences = np.asarray(values, float) - np.asarray(reference, float)
    if differences.ndim != 1 or differences.size < 2:
        raise ValueError(f"a paired difference needs two or more seeds of each, got {differences.size}")
    n, mean, std = differences.size, float(differences.mean()), float(differences.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
    if std == 0:
        p_value = 1.0 if mean == 0 else 0.0
    else:
        p_value = float(2 * scipy_stats.t.sf(abs(mean) / (std / np.sqrt(n)), n - 1))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "p": p_value, "n": n}


def group_correct_by_slide(probability: np.ndarray, label: np.ndarray, group: np.ndarray, slide_id: np.ndarray,
                           slides: Sequence[str], num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slide and group, the correctly classified patches and all patches, `[S, G]` each. A patch is
    predicted tumour when its tumour probability is above 0.5 (the evaluator's argmax: a tie is non-tumour)."""
    predicted = (np.asarray(probability) > 0.5).astype(np.int64)
    index = {slide: i for i, slide in enumerate(slides)}
    rows = np.array([index[s] for s in np.asarray(slide_id)], np.int64)
    flat = rows * num_groups + np.asarray(group, np.int64)
    size = len(slides) * num_groups
    total = np.bincount(flat, minlength=size).reshape(len(slides), num_groups)
    correct = np.bincount(flat, weights=predicted == np.asarray(label), minlength=size).reshape(total.shape)
    return correct, total


def worst_group_accuracy(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """The lowest accuracy over the groups that hold patches, over the last axis (`[..., G]`)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(total > 0, correct / np.maximum(total, 1), np.inf)
    return accuracy.min(axis=-1)


def slide_bootstrap(per_run: Sequence[tuple[np.ndarray, np.ndarray]], *, replicates: int = BOOTSTRAP_REPLICATES,
                    seed: int = 0) -> np.ndarray:
    """Bootstrap replicates over test slides of the mean WGA of several runs (seeds of one method).

    `per_run`: each run's `(correct, total)` per slide and group (`group_correct_by_slide`, one slide
    order). Each replicate draws the slides with replacement (`numpy.random.default_rng(seed)`, the
    same draws for every call with the same seed and number of slides, so two methods' replicates
    are paired), sums each run's counts over the drawn slides and averages the runs' WGAs. Returns `[replicates]`.
    """
    num_slides = per_run[0][0].shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(num_slides, np.full(num_slides, 1.0 / num_slides), size=replicates)  # [R, S]
    wga = [worst_group_accuracy(weights @ correct, weights @ total) for correct, total in per_run]
    return np.mean(wga, axis=0)


def percentile_interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    low, high = np.quantile(replicates, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return float(low), float(high)


def describe_difference(difference: Mapping[str, Any], points: bool = True) -> str:
    """`+1.2 [-3.4, +5.6] points, p = 0.51` in percentage points (or raw with `points=False`); p to two
    significant digits, so a small one does not read as zero."""
    scale, unit = (100.0, " points") if points else (1.0, "")
    return (f"{scale * difference['mean']:+.1f} [{scale * difference['low']:+.1f}, {scale * difference['high']:+.1f}]"
            f"{unit}, p = {difference['p']:.2g}")
