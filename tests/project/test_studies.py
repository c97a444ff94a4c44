"""The open-question studies: their statistics against numpy, the density weights against a brute-force
kernel sum, and both studies' smoke paths end to end (tables checked against patches.csv)."""
from __future__ import annotations

import csv
import pathlib
import shutil

import numpy as np
import pytest

from experiments import continuous_attribute, patch_size
from gerne_jax.core.errors import ConfigError, InputError
from gerne_jax.data import dataset
from gerne_jax.data.groups import BIASED
from gerne_jax.methods import ratio_weighted, registry
from gerne_jax.train import trainer


def brute_force_density(samples: np.ndarray, points: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernels at every sample and at its mirror images about 0 and 1, summed at every point."""
    def kernel(d: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * (d / bandwidth) ** 2) / (bandwidth * np.sqrt(2 * np.pi))
    p, s = points[:, None], samples[None]
    return np.mean(kernel(p - s) + kernel(p + s) + kernel(p - (2 - s)), axis=1)


def test_reflected_density_matches_brute_force_kernel_sum():
    rng = np.random.default_rng(0)
    # Both ends piled up as tissue ratios are: exact zeros and ones, and mass near each.
    samples = np.concatenate([np.zeros(20), rng.uniform(0, 0.15, 300), rng.beta(6, 1, 400), np.ones(150)])
    points = np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 200)])
    for bandwidth in (0.02, 0.05, 0.2):
        np.testing.assert_allclose(ratio_weighted.reflected_density(samples, points, bandwidth),
                                   brute_force_density(samples, points, bandwidth), rtol=1e-3)
    grid = np.linspace(0, 1, 20001)
    assert np.trapezoid(ratio_weighted.reflected_density(samples, grid, 0.05), grid) == pytest.approx(1, abs=1e-4)


def test_inverse_density_weights_per_class():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 2, 500)
    ratio = np.where(label == 1, rng.beta(5, 1, 500), rng.beta(1, 5, 500))
    weights = ratio_weighted.inverse_density_weights(ratio, label, 2, 0.05)
    for y in (0, 1):
        members = label == y
        expected = 1 / brute_force_density(ratio[members], ratio[members], 0.05)
        np.testing.assert_allclose(weights[members], expected / expected.mean(), rtol=1e-3)
    for bad in (0.0, -0.1, float("nan"), 2.0):
        with pytest.raises(ConfigError, match="method.ratio_weighted.bandwidth"):
            ratio_weighted.inverse_density_weights(ratio, label, 2, bad)


def test_ratio_weighted_method_draws_by_inverse_density(tiny_config, tiny_data):
    train = tiny_data.splits["train"]
    config = tiny_config("ratio_weighted")
    attribute = dataset.attribute_from_tissue_ratio(train["tissue_ratio"], config.data.taus)
    method = registry.create(config)
    method.prepare(train, attribute, trainer.Context(config, {}, None))
    expected = ratio_weighted.inverse_density_weights(train["tissue_ratio"], train["label"], 2,
                                                      config.method.ratio_weighted.bandwidth)
    np.testing.assert_allclose(method.weights, expected)
    assert method.rows == (BIASED,) and method.examples_per_step == method.plan.batch_size
    # The sampler's draws within each class follow the weights (chi-square-sized tolerance).
    sampler = method.sampler(0)
    drawn = np.concatenate([sampler(step).ravel() for step in range(3000)])
    frequency = np.bincount(drawn, minlength=train["label"].size)
    for y in (0, 1):
        members = train["label"] == y
        share = frequency[members] / frequency[members].sum()
        target = expected[members] / expected[members].sum()
        assert np.abs(share - target).max() < 5 * np.sqrt(target.max() / frequency[members].sum())
    with pytest.raises(KeyError, match="tissue_ratio"):  # the split must carry its tissue ratios
        method.prepare({"label": train["label"]}, attribute, trainer.Context(config, {}, None))


def test_shortcut_strength_matches_numpy(tiny_data):
    table = dataset.read_patch_table(tiny_data.path)
    strength = patch_size.shortcut_strength(table, 0.1)
    train = tiny_data.splits["train"]
    label, ratio = train["label"], train["tissue_ratio"].astype(np.float64)
    tumour, non_tumour = label == 1, label == 0
    assert strength["train patches"] == label.size
    assert strength["tumour share r < 0.1"] == pytest.approx(np.mean(ratio[tumour] < 0.1))
    assert strength["non-tumour share r >= 0.1"] == pytest.approx(np.mean(ratio[non_tumour] >= 0.1))
    assert strength["mean ratio gap"] == pytest.approx(ratio[tumour].mean() - ratio[non_tumour].mean(), abs=1e-6)
    assert strength["median ratio gap"] == pytest.approx(np.median(ratio[tumour]) - np.median(ratio[non_tumour]),
                                                         abs=1e-6)
    assert strength["empty groups"] == "none"


def test_quantile_taus():
    rng = np.random.default_rng(2)
    ratio = rng.uniform(0, 1, 1000)
    for bins in (3, 4, 5):
        taus = continuous_attribute.quantile_taus(ratio, bins)
        assert taus == pytest.approx(np.quantile(ratio, np.arange(1, bins) / bins))
        shares = np.bincount(dataset.attribute_from_tissue_ratio(ratio, taus))
        assert shares.min() >= 1000 // bins - 1  # about equal bins
    # Half the ratios are exactly 1: the quantiles above 1/2 tie at 1 and merge into one threshold.
    tied = np.concatenate([rng.uniform(0, 0.9, 500), np.ones(500)])
    assert continuous_attribute.quantile_taus(tied, 5) == pytest.approx(
        [np.quantile(tied, 0.2), np.quantile(tied, 0.4), 1.0])
    with pytest.raises(InputError, match="no threshold"):
        continuous_attribute.quantile_taus(np.ones(10), 3)


def _csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _train_patches(data_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and tissue ratios of the training split, read from patches.csv with the csv module alone."""
    rows = [row for row in _csv(data_dir / dataset.PATCHES_CSV) if row["split"] == "train"]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["tissue_ratio"]) for r in rows])


@pytest.mark.slow
def test_studies_smoke_end_to_end(tmp_path):
    """Both `--smoke` paths on the same small slides; their tables against numpy over patches.csv, and a
    rerun that trains nothing."""
    root = tmp_path / "patch_size"
    assert patch_size.main(["--root", str(root), "--smoke", "--patch-sizes", "32"]) == 0
    (row,) = _csv(root / "results.csv")
    label, ratio = _train_patches(root / "data_p32")
    assert int(row["train patches"]) == label.size
    assert float(row["tumour share r < 0.1"]) == pytest.approx(np.mean(ratio[label == 1] < 0.1))
    assert float(row["non-tumour share r >= 0.1"]) == pytest.approx(np.mean(ratio[label == 0] >= 0.1))
    assert float(row["median ratio gap"]) == pytest.approx(
        np.median(ratio[label == 1]) - np.median(ratio[label == 0]), abs=1e-6)
    # ERM's gap and GERNE's gain from the per-run table of the grid (one seed: the run's own figures).
    runs = {(r["family"], r["checkpoint"]): r for r in _csv(root / "p32" / "results.csv")}
    erm, gerne = runs["erm", "best_wga"], runs["gerne", "best_wga"]
    assert float(row["erm BCA - WGA"]) == pytest.approx(float(erm["test BCA"]) - float(erm["test WGA"]))
    assert float(row["gerne WGA gain"]) == pytest.approx(float(gerne["test WGA"]) - float(erm["test WGA"]))
    assert (root / "patch_size.png").stat().st_size > 0

    # The continuous study on the same slides and patches (copied: its data step then skips them).
    other = tmp_path / "continuous"
    other.mkdir()
    for name in ("slides", "data_p32"):
        shutil.copytree(root / name, other / name)
    argv = ["--root", str(other), "--smoke", "--patch-size", "32", "--bins", "3", "--methods", "ratio_weighted",
            "gerne"]
    assert continuous_attribute.main(argv) == 0
    rows = {(r["method"], r["taus"]): r for r in _csv(other / "results.csv")}
    _, ratio = _train_patches(other / "data_p32")
    quantiles = np.quantile(ratio, [1 / 3, 2 / 3])
    binned = [key for key in rows if key[0] == "gerne" and key[1] != "0.1"]
    assert len(binned) == 1 and [float(t) for t in binned[0][1].split("+")] == pytest.approx(quantiles)
    assert set(rows) == {("ratio_weighted", "0.1"), ("gerne", "0.1"), binned[0]}
    for r in rows.values():
        assert all(0.0 <= float(r[f"test WGA {tau:g} mean"]) <= float(r["test BCA mean"]) + 1e-9
                   for tau in continuous_attribute.PAPER_TAUS)
    stamps = {p: p.stat().st_mtime_ns for p in (other / "runs").glob("*/metrics.jsonl")}
    assert len(stamps) == 3
    assert continuous_attribute.main(argv) == 0  # resumed: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (other / "runs").glob("*/metrics.jsonl")} == stamps
