"""Tests of data_pipeline.splits: patient-disjoint, seeded splits and the split-count rounding."""
from __future__ import annotations

import pathlib

import pytest

from data_pipeline.splits import assign_splits, split_counts
from gerne_jax.slides.manifest import SlideSpec


def spec(slide_id, patient=None, split=None):
    return SlideSpec(slide_id, (pathlib.Path("i.tif"),), pathlib.Path("m.tif"), patient_id=patient, split=split)


def test_patient_splits_are_disjoint_seeded_and_follow_fractions():
    specs = [spec(f"s{i}", f"p{i // 3}" if i < 60 else None) for i in range(90)]  # 20 patients + 30 alone
    split_of = assign_splits(specs, (0.6, 0.2, 0.2), seed=0)
    assert split_of == assign_splits(specs, (0.6, 0.2, 0.2), seed=0)
    assert split_of != assign_splits(specs, (0.6, 0.2, 0.2), seed=1)
    by_patient = {}
    for s in specs:
        by_patient.setdefault(s.patient_id or s.slide_id, set()).add(split_of[s.slide_id])
    assert all(len(splits) == 1 for splits in by_patient.values())
    groups = [next(iter(v)) for v in by_patient.values()]
    assert [groups.count(name) for name in ("train", "validation", "test")] == [30, 10, 10]


def test_split_counts_keep_every_split_when_possible():
    assert split_counts(3, (0.6, 0.2, 0.2)) == [1, 1, 1]
    assert split_counts(2, (0.6, 0.2, 0.2)) == [1, 1, 0]  # 1.2, 0.4, 0.4: remainder to validation
    assert split_counts(10, (0.7, 0.3, 0.0)) == [7, 3, 0]
    assert split_counts(7, (0.6, 0.2, 0.2)) == [4, 2, 1]  # 4.2, 1.4, 1.4: tie goes to the earlier
    for n in range(1, 40):
        assert sum(split_counts(n, (0.5, 0.3, 0.2))) == n


def test_manifest_splits_win_and_must_be_complete():
    specs = [spec("a", "p", "train"), spec("b", "q", "test")]
    assert assign_splits(specs, (0.6, 0.2, 0.2), 0) == {"a": "train", "b": "test"}
    with pytest.raises(ValueError, match=r"split column is empty for slide\(s\) \['c'\]"):
        assign_splits(specs + [spec("c")], (0.6, 0.2, 0.2), 0)
    with pytest.warns(UserWarning, match="one patient in several splits"):
        assign_splits([spec("a", "p", "train"), spec("b", "p", "test")], (0.6, 0.2, 0.2), 0)
    with pytest.raises(ValueError, match="--split-fractions"):
        assign_splits([spec("a")], (0.5, 0.2, 0.2), 0)
