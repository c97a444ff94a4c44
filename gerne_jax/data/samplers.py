"""Batch-index samplers: which training examples each step's batches hold, a pure function of (seed, step).

Every sampler draws from a generator seeded by (seed, step) (`StepSampler.rng`), so a resumed run draws
exactly what an uninterrupted one would, and `input_pipeline.train_dataset` takes its further draws
(augmentations) from the same generator after the indices.

- `PairedIndexSampler`: both batches of GERNE's pair `[2, N]` per a `groups.BatchPlan` (ERM, GroupDRO
  and resampling load one row of it).
- `UpsampledIndexSampler`: one class-balanced batch `[1, N]` drawn with per-example weights (JTT,
  ratio_weighted; with equal weights, ERM's `class_balanced` sampling, which never reads the attribute).
- `NaturalIndexSampler`: one batch `[1, N]` of distinct examples drawn uniformly from the whole training
  split (a draw window over all examples) (plain ERM, `natural` sampling: neither the class nor the attribute is read).

Sampling within a group (the official `corr` overlap, generalised): a group with biased count `n_b` and
less-biased count `n_lb` (`groups.BatchPlan`) draws a window of `w = rint(n_b + n_lb - corr * min(n_b,
n_lb))` distinct members (`round(B * (2 - corr))` when both counts are B, as in the official code). The
biased batch draws its `n_b` items with replacement from the first `n_b` window items, the less-biased
batch its `n_lb` items with replacement from the last `n_lb`. A group with fewer than `w` members fills
the window with successive random permutations of all its members, so items repeat as evenly as
possible. Each batch is then shuffled, so a process's slice is not one group. Pure numpy.
"""
from __future__ import annotations

import numpy as np

from gerne_jax.data import dataset, groups


class StepSampler:
    """Base of the batch-index samplers: each step's draws come from a generator seeded by (seed, step),
    so a resumed run draws exactly what an uninterrupted one would.

    A subclass sets `batch_size` (N, the global size of each batch) and implements `draw(rng)`, the
    step's indices `[R, N]` (R = 1 or 2 rows).
    """

    batch_size: int

    def __init__(self, seed: int):
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._seed = int(seed)

    def rng(self, step: int) -> np.random.Generator:
        """The step's generator; the batch indices are its first draws."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return np.random.default_rng([self._seed, int(step)])

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, step: int) -> np.ndarray:
        return self.draw(self.rng(step))


class PairedIndexSampler(StepSampler):
    """Global example indices of both batches of a step, `[2, N]`, a pure function of (seed, step).

    Row 0 is the biased batch, row 1 the less-biased one, each drawn group by group as the module
    docstring describes and then shuffled.
    """

    def __init__(self, plan: groups.BatchPlan, label: np.ndarray, attribute: np.ndarray, seed: int):
        ids = dataset.group_ids(label, attribute, plan.num_classes, plan.num_attributes)
        counts = np.bincount(ids, minlength=plan.biased_counts.size).reshape(plan.biased_counts.shape)
        if not np.array_equal(counts, plan.group_counts):
            raise ValueError(f"the plan was made for group counts {plan.group_counts.tolist()} but these "
                             f"labels and attributes give {counts.tolist()}")
        super().__init__(seed)
        order = np.argsort(ids, kind="stable")
        self._members = np.split(order, np.cumsum(counts.ravel())[:-1])
        self._plan = plan
        self.batch_size = plan.batch_size

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Indices `[2, N]` (biased, less-biased) drawn from a fresh `rng(step)`."""
        plan = self._plan
        biased, less_biased = [], []
        for members, n_b, n_lb, window_size in zip(self._members, plan.biased_counts.ravel(),
                                                     plan.less_biased_counts.ravel(),
                                                     plan.window_sizes.ravel()):
            if window_size == 0:
                continue
            window = draw_window(rng, members, window_size)
            biased.append(window[rng.integers(0, n_b, size=n_b)])
            less_biased.append(window[window_size - n_lb + rng.integers(0, n_lb, size=n_lb)])
        return np.stack([rng.permutation(np.concatenate(biased)), rng.permutation(np.concatenate(less_biased))])


class UpsampledIndexSampler(StepSampler):
    """Global example indices of a step's single batch, `[1, N]`, a pure function of (seed, step).

    Class y gets the plan's `A * B` places (class-balanced, like ERM's biased batch), drawn with
    replacement with probability proportional to each member's weight; the batch is then shuffled.
    """

    def __init__(self, plan: groups.BatchPlan, label: np.ndarray, weights: np.ndarray, seed: int):
        label, weights = np.asarray(label), np.asarray(weights, np.float64)
        if weights.shape != label.shape or np.any(~np.isfinite(weights) | (weights < 0)):
            raise ValueError(f"weights must be {label.shape} finite non-negative numbers, got shape {weights.shape}")
        super().__init__(seed)
        self._members = [np.flatnonzero(label == y) for y in range(plan.num_classes)]
        self._probabilities = [weights[m] / weights[m].sum() for m in self._members]
        self._per_class = plan.biased_counts.sum(axis=1)
        self.batch_size = plan.batch_size

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        drawn = [rng.choice(members, size=count, p=p)
                 for members, p, count in zip(self._members, self._probabilities, self._per_class)]
        return rng.permutation(np.concatenate(drawn))[None]


class NaturalIndexSampler(StepSampler):
    """Global example indices of a step's single batch, `[1, N]`: `N` distinct examples drawn uniformly
    from all `num_examples` (successive permutations if there are fewer), whatever their class or group."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        super().__init__(seed)
        self._all = np.arange(num_examples)
        self.batch_size = int(batch_size)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return draw_window(rng, self._all, self.batch_size)[None]


def draw_window(rng: np.random.Generator, members: np.ndarray, size: int) -> np.ndarray:
    """`size` distinct members in random order, or successive permutations if the group is smaller."""
    if members.size >= size:
        return rng.choice(members, size=size, replace=False)
    rounds = -(-size // members.size)
    return np.concatenate([rng.permutation(members) for _ in range(rounds)])[:size]
