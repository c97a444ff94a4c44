"""Tests of `python -m data_pipeline stats`: printed group counts against a brute-force count."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from data_pipeline import shards
from data_pipeline.__main__ import main
from gerne_jax.data.dataset import DatasetError

TAUS = (0.03, 0.125, 0.25)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 300), ("validation", 80), ("test", 50)):
        splits[split] = {
            "image": rng.integers(0, 255, size=(n, 2, 2, 1)).astype(np.uint8),
            "label": rng.integers(0, 2, n),
            # multiples of 1/64 (exact in float32), so some ratios sit exactly on a tau
            "tissue_ratio": rng.integers(1, 65, n) / 64,
            "tumour_fraction": rng.random(n),
            "slide_id": np.array([f"{split}{i % 4}" for i in range(n)]),
            "patient_id": np.array([""] * n), "x": np.zeros(n, int), "y": np.zeros(n, int)}
    shards.write_patch_dataset(data_dir, splits, ["gray"])
    return data_dir, splits


def test_printed_counts_equal_brute_force(dataset, capsys):
    data_dir, splits = dataset
    assert main(["stats", "--data-dir", str(data_dir), "--tau", *map(str, TAUS)]) == 0
    out = capsys.readouterr().out
    blocks = out.split("tau = ")[1:]
    assert len(blocks) == len(TAUS)
    for tau, block in zip(TAUS, blocks):
        assert block.startswith(f"{tau:g} ")
        for split, arrays in splits.items():
            line = next(line for line in block.splitlines() if line.startswith(split + " "))
            cells = [(int(n), float(p)) for n, p in re.findall(r"(\d+) \((\d+\.\d)%\)", line)]
            expected = []
            for label in (0, 1):
                for attribute in (0, 1):
                    count = sum(1 for y, r in zip(arrays["label"], arrays["tissue_ratio"])
                                if y == label and (r >= tau) == bool(attribute))
                    expected.append(count)
            assert [n for n, _ in cells] == expected, (tau, split)
            total = len(arrays["label"])
            assert [p for _, p in cells] == [round(100 * n / total, 1) for n in expected]
            assert line.split()[-1] == str(total)


def test_plot_is_written(dataset, tmp_path, capsys):
    data_dir, _ = dataset
    assert main(["stats", "--data-dir", str(data_dir), "--tau", "0.1"]) == 0
    with Image.open(data_dir / "tissue_ratio.png") as png:
        assert png.format == "PNG"
    target = tmp_path / "elsewhere.png"
    assert main(["stats", "--data-dir", str(data_dir), "--out", str(target)]) == 0
    assert target.is_file()


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DatasetError, match="patches.csv is missing"):
        main(["stats", "--data-dir", str(tmp_path)])
