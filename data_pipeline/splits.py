"""Which split each slide goes to: the manifest's `split` column, or patients dealt out by fractions.

No slide or patient contributes patches to two splits (docs/design.md §2, Splits): patches of one
slide are strongly correlated and would leak between splits.
"""
from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Sequence

import numpy as np

from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides.manifest import SlideSpec


def split_counts(num_groups: int, fractions: Sequence[float]) -> list[int]:
    """Groups per split: largest remainders of fractions * n, then every split with a positive
    fraction gets at least one group while there are enough groups (taken from the largest)."""
    counts = dataset.largest_remainder(np.asarray(fractions, np.float64), num_groups, normalise=False)[0]
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if num_groups >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts.tolist()


def assign_splits(specs: Sequence[SlideSpec], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Slide id -> split. The manifest's `split` column wins if present (then every row needs one);
    otherwise patients (a slide without patient id is its own patient) are shuffled with `seed` and
    dealt to train / validation / test by `fractions`, so a patient's slides share one split."""
    given = {spec.slide_id: spec.split for spec in specs if spec.split}
    if given:
        missing = [spec.slide_id for spec in specs if not spec.split]
        if missing:
            raise InputError(f"manifest: the split column is empty for slide(s) {missing}; give a "
                             "split for every slide or for none")
        patients = collections.defaultdict(set)
        for spec in specs:
            if spec.patient_id:
                patients[spec.patient_id].add(spec.split)
        shared = {p: sorted(s) for p, s in patients.items() if len(s) > 1}
        if shared:
            warnings.warn(f"manifest splits put one patient in several splits: {shared}", stacklevel=2)
        return given
    if len(fractions) != len(dataset.SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise InputError(f"--split-fractions must be 3 non-negative numbers summing to 1 "
                         f"(train validation test), got {list(fractions)}")
    groups = sorted({spec.patient_id or f"slide:{spec.slide_id}" for spec in specs})
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.cumsum(split_counts(len(groups), fractions))
    split_of_group = {groups[g]: dataset.SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
                      for rank, g in enumerate(order)}
    return {spec.slide_id: split_of_group[spec.patient_id or f"slide:{spec.slide_id}"] for spec in specs}
