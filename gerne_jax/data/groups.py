"""Groups, the alpha table, the beta bound and the per-step batch plan of GERNE (docs/design.md §3).

Pure numpy. The attribute is any integer per example: tissue-ratio bins (`dataset.attribute_from_tissue_ratio`),
pseudo-groups, a colour, a scanner id. With K classes and A attribute bins:

- `alpha[y, a] = |X_(y,a)| / |X_y|`, measured on the training split;
- biased batch: within class y, bin a gets share `alpha[y, a]`;
- less-biased batch: share `(1 - c) * alpha[y, a] + c / A_y`, `A_y` the number of bins of class y kept in
  the batch (all A unless empty groups are dropped, as in the official code);
- both batches hold exactly `A * B` examples per class (largest-remainder rounding), so both have the
  static size `N = K * A * B` and can be stacked;
- `beta` must lie in `[-1, beta_max]`; past `beta_max` some group gets a negative weight in
  `(1 + beta) * L_lb - beta * L_b`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gerne_jax.core.errors import ConfigError
from gerne_jax.data.dataset import largest_remainder

EMPTY_GROUP_POLICIES = ("error", "drop")
BIASED, LESS_BIASED = 0, 1  # the two batches of a step, on the leading axis of a paired batch


def alpha_table(counts: np.ndarray) -> np.ndarray:
    """`alpha[y, a] = |X_(y,a)| / |X_y|` from group counts `[K, A]`; rows of empty classes are NaN."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / counts.sum(axis=1, keepdims=True)


def uniform_targets(counts: np.ndarray, empty_group: str = "error") -> np.ndarray:
    """The `1 / A_y` term of the less-biased shares, `[K, A]`.

    `A_y = A`, except with `empty_group="drop"`: then `A_y` counts the non-empty bins of class y and empty
    groups get 0, so they never enter the less-biased batch (official code).
    """
    if empty_group not in EMPTY_GROUP_POLICIES:
        raise ValueError(f"empty_group must be one of {EMPTY_GROUP_POLICIES}, got {empty_group!r}")
    counts = np.asarray(counts)
    kept = counts > 0 if empty_group == "drop" else np.ones(counts.shape, bool)
    return np.where(kept, 1.0 / np.maximum(kept.sum(axis=1, keepdims=True), 1), 0.0)


def less_biased_shares(alpha: np.ndarray, c: float, targets: np.ndarray) -> np.ndarray:
    """Share of each bin within its class in the less-biased batch: `(1 - c) * alpha + c * targets`."""
    return (1.0 - c) * np.asarray(alpha) + c * np.asarray(targets)


def beta_max(alpha: np.ndarray, c: float, targets: np.ndarray | None = None) -> float:
    """Largest beta keeping every `p_ext(a|y) = alpha + c * (beta + 1) * (u - alpha)` non-negative.

    `u` is `targets` (default `1 / A`). A group with `alpha > u` needs `beta <= alpha / (c * (alpha - u)) - 1`;
    the bound is the smallest of these. With `u = 1 / A` this is docs/design.md §3's
    `alpha_max / (c * (alpha_max - 1/A)) - 1`. It is `inf` when no group lies above its target.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    targets = np.full(alpha.shape, 1.0 / alpha.shape[-1]) if targets is None else np.asarray(targets)
    above = alpha > targets
    if not np.any(above):
        return float("inf")
    return float(np.min(alpha[above] / (c * (alpha[above] - targets[above])) - 1.0))


def overlap_window_sizes(biased_counts: np.ndarray, less_biased_counts: np.ndarray, corr: float) -> np.ndarray:
    """Distinct items drawn per group and step: `rint(n_b + n_lb - corr * min(n_b, n_lb))`.

    Written as `rint(min * (2 - corr) + (max - min))` so that with `n_b = n_lb = B` it is exactly the
    official `round(B * (2 - corr))` (round half to even, like Python's `round`). The biased batch draws
    from the first `n_b` items of the window, the less-biased batch from the last `n_lb`, so they share
    `n_b + n_lb - window` items, about `corr` of the smaller count.
    """
    n_b = np.asarray(biased_counts, dtype=np.int64)
    n_lb = np.asarray(less_biased_counts, dtype=np.int64)
    smaller, larger = np.minimum(n_b, n_lb), np.maximum(n_b, n_lb)
    return (np.rint(smaller * (2.0 - corr)) + (larger - smaller)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How many examples of each group `(y, a)` the biased and the less-biased batch of every step hold."""

    group_counts: np.ndarray        # [K, A] training examples per group
    alpha: np.ndarray               # [K, A]
    c: float
    beta: float
    beta_max: float
    corr: float
    batch_per_group: int            # B
    biased_counts: np.ndarray       # [K, A], every row sums to A * B
    less_biased_counts: np.ndarray  # [K, A], every row sums to A * B
    window_sizes: np.ndarray        # [K, A], see `overlap_window_sizes`
    class_names: tuple[str, ...]
    bin_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return self.alpha.shape[0]

    @property
    def num_attributes(self) -> int:
        return self.alpha.shape[1]

    @property
    def batch_size(self) -> int:
        """`N = K * A * B`, the size of each of the two batches."""
        return self.num_classes * self.num_attributes * self.batch_per_group

    @property
    def group_weights(self) -> np.ndarray:
        """Each group's total weight in `(1 + beta) * L_lb - beta * L_b` (they sum to 1), `[K, A]`."""
        return ((1 + self.beta) * self.less_biased_counts - self.beta * self.biased_counts) / self.batch_size

    def group_name(self, y: int, a: int) -> str:
        return f"({self.class_names[y]}, {self.bin_names[a]})"

    def describe(self) -> str:
        """The alpha table, the beta range and both batch compositions, as a text table."""
        width = max(len(self.group_name(y, a)) for y in range(self.num_classes)
                    for a in range(self.num_attributes)) + 2
        lines = [format_alpha_table(self.group_counts, self.class_names, self.bin_names),
                 f"c = {self.c:g}, beta = {self.beta:g} (allowed [-1, {self.beta_max:.4g}]), "
                 f"corr = {self.corr:g}, batch_per_group = {self.batch_per_group}, "
                 f"N = {self.batch_size} per batch",
                 "group".ljust(width) + "biased  less-biased  window  weight"]
        for y in range(self.num_classes):
            for a in range(self.num_attributes):
                lines.append(f"{self.group_name(y, a):<{width}}{self.biased_counts[y, a]:>6}"
                             f"{self.less_biased_counts[y, a]:>13}{self.window_sizes[y, a]:>8}"
                             f"{self.group_weights[y, a]:>8.3f}")
        return "\n".join(lines)


def format_alpha_table(counts: np.ndarray, class_names: Sequence[str], bin_names: Sequence[str]) -> str:
    """Rows = classes, columns = bins, each cell `alpha (examples)`."""
    counts = np.asarray(counts)
    alpha = alpha_table(counts)
    cells = [[f"{alpha[y, a]:.4f} ({counts[y, a]})" for a in range(counts.shape[1])]
             for y in range(counts.shape[0])]
    corner = "alpha[y, a] (examples)"
    first = max(len(corner), *(len(name) for name in class_names))
    widths = [max(len(name), *(len(row[a]) for row in cells)) for a, name in enumerate(bin_names)]
    rows = [corner.ljust(first) + "".join(f"  {name:>{w}}" for name, w in zip(bin_names, widths))]
    for name, row in zip(class_names, cells):
        rows.append(name.ljust(first) + "".join(f"  {cell:>{w}}" for cell, w in zip(row, widths)))
    return "\n".join(rows)


def make_batch_plan(counts: np.ndarray, *, c: float, beta: float, batch_per_group: int, corr: float = 0.5,
                    empty_group: str = "error", class_names: Sequence[str] | None = None,
                    bin_names: Sequence[str] | None = None) -> BatchPlan:
    """Checks a GERNE config against the training groups and plans both batches of every step.

    Args:
      counts: `[K, A]` training examples per group (`group_counts`).
      c: bias-reduction factor, in (0, 1].
      beta: extrapolation factor, in `[-1, beta_max]`.
      batch_per_group: B; each class gets `A * B` examples in each batch.
      corr: overlap knob of the official sampler, in [0, 1].
      empty_group: "error" refuses empty groups; "drop" leaves them out of the less-biased batch.
      class_names, bin_names: used in messages and `describe()`; default "class y" and "a=i".

    Raises:
      ConfigError: naming the config key (`method.beta`, `method.c`, `method.corr`, `method.empty_group`,
        `training.batch_per_group`) and its allowed values on the first line, the alpha table below it.
      ValueError: for `counts` or names that do not fit together (a bug of the caller, not the config).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise ValueError(f"counts must be a [classes, bins] table of non-negative integers, got {counts!r}")
    num_classes, num_attributes = counts.shape
    class_names = tuple(class_names or (f"class {y}" for y in range(num_classes)))
    bin_names = tuple(bin_names or (f"a={a}" for a in range(num_attributes)))
    if len(class_names) != num_classes or len(bin_names) != num_attributes:
        raise ValueError(f"{len(class_names)} class names and {len(bin_names)} bin names given for a "
                         f"{num_classes} x {num_attributes} table of group counts")
    table = format_alpha_table(counts, class_names, bin_names)

    def config_error(problem: str) -> ConfigError:
        return ConfigError(f"invalid GERNE config: {problem}\n{table}")

    if not 0.0 < c <= 1.0:
        raise config_error(f"method.c = {c} must lie in (0, 1].")
    if not 0.0 <= corr <= 1.0:
        raise config_error(f"method.corr = {corr} must lie in [0, 1].")
    if int(batch_per_group) != batch_per_group or batch_per_group < 1:
        raise config_error(f"training.batch_per_group = {batch_per_group} must be a positive integer: each "
                           f"class fills A * B = {num_attributes} * batch_per_group places per batch.")
    empty_classes = [class_names[y] for y in range(num_classes) if counts[y].sum() == 0]
    if empty_classes:
        raise config_error(f"class {', '.join(empty_classes)} has no training examples; check data.dir and "
                           "data.taus.")
    if empty_group not in EMPTY_GROUP_POLICIES:
        raise config_error(f"method.empty_group = {empty_group!r} must be one of {EMPTY_GROUP_POLICIES}.")
    empty = [f"({class_names[y]}, {bin_names[a]})" for y, a in zip(*np.nonzero(counts == 0))]
    if empty and empty_group == "error":
        raise config_error(f"group {', '.join(empty)} has no training examples; choose other data.taus "
                           "or set method.empty_group='drop' to leave empty groups out of the less-biased batch.")

    alpha = alpha_table(counts)
    targets = uniform_targets(counts, empty_group)
    upper = beta_max(alpha, c, targets)
    if not (np.isfinite(beta) and -1.0 <= beta <= upper):
        raise config_error(f"method.beta = {beta} lies outside [-1, beta_max] = [-1, {upper:.6g}] (for "
                           f"method.c = {c:g} and these training groups); past beta_max some group gets a "
                           "negative weight and training diverges.")

    class_total = num_attributes * int(batch_per_group)
    biased = largest_remainder(alpha, class_total)
    less_biased = largest_remainder(less_biased_shares(alpha, c, targets), class_total)
    plan = BatchPlan(group_counts=counts, alpha=alpha, c=float(c), beta=float(beta), beta_max=upper,
                     corr=float(corr), batch_per_group=int(batch_per_group), biased_counts=biased,
                     less_biased_counts=less_biased, window_sizes=overlap_window_sizes(biased, less_biased, corr),
                     class_names=class_names, bin_names=bin_names)
    negative = np.argwhere(plan.group_weights < 0)
    if negative.size:
        names = ", ".join(plan.group_name(y, a) for y, a in negative)
        raise config_error(f"method.beta = {beta} gives group {names} a negative weight once the batch counts are "
                           f"rounded to whole examples (biased {biased.tolist()}, less-biased "
                           f"{less_biased.tolist()}); lower method.beta (allowed [-1, {upper:.6g}] before "
                           "rounding) or raise training.batch_per_group.")
    return plan
