"""Importance weights from the continuous tissue ratio, without binarising it (method `ratio_weighted`).

Each training example of class y is drawn with probability proportional to `1 / f_y(r)`, where `f_y`
is a Gaussian kernel density estimate of the tissue ratio `r` over the training examples of class y
(bandwidth `method.ratio_weighted.bandwidth`). Within a class the draws are then close to uniform over
the tissue ratio: the rare ratios of a class (tumour with little tissue, non-tumour full of tissue)
are drawn as often as its common ones, with no threshold tau. The class-balanced batch and the sampler
are JTT's (`samplers.UpsampledIndexSampler`), only the weights differ (`RatioWeighted`).

Tissue ratios live in [0, 1] and pile up at both ends, so the estimate reflects the kernels at 0 and 1
(a kernel's mass outside [0, 1] folds back in); otherwise the density at the ends would be about halved
and the examples there, the commonest of each class, upweighted. The density is computed on a grid of
`GRID` points by linear binning and a convolution with the sampled kernel (as KDEpy and statsmodels do
for large samples), then interpolated: linear in the number of examples, with an error far below the
kernel's width.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import signal

from gerne_jax.core.errors import ConfigError
from gerne_jax.data import dataset
from gerne_jax.methods import weighted_batch
from gerne_jax.train import trainer

GRID = 4097  # grid points on [0, 1]: spacing 1/4096, far below any useful bandwidth


def _check_bandwidth(bandwidth: float) -> float:
    if not (np.isfinite(bandwidth) and 0.0 < bandwidth <= 1.0):
        raise ConfigError(f"config method.ratio_weighted.bandwidth = {bandwidth} must be a number in (0, 1] "
                          "(the kernel's standard deviation, in units of tissue ratio)")
    return float(bandwidth)


def reflected_density(samples: np.ndarray, points: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernel density of `samples` (in [0, 1]) at `points`, kernels reflected at 0 and 1."""
    bandwidth = _check_bandwidth(bandwidth)
    samples = np.clip(np.asarray(samples, np.float64), 0.0, 1.0)
    if samples.size == 0:
        raise ValueError("a density needs at least one sample")
    grid = np.linspace(0.0, 1.0, GRID)
    step = grid[1] - grid[0]
    # Linear binning: each sample's unit mass split between its two grid neighbours.
    position = samples / step
    low = np.minimum(np.floor(position).astype(np.int64), GRID - 2)
    upper_share = position - low
    mass = (np.bincount(low, 1.0 - upper_share, GRID) + np.bincount(low + 1, upper_share, GRID)) / samples.size
    # Reflection at both ends = the kernel convolved with the mass and its mirror images about 0 and
    # about 1 (grid points -1 ... 2); the mass on an end point is its own mirror image, so it counts twice.
    core = mass.copy()
    core[[0, -1]] *= 2.0
    mirrored = np.concatenate([mass[:0:-1], core, mass[-2::-1]])
    reach = min(int(np.ceil(6.0 * bandwidth / step)), 2 * (GRID - 1))
    offsets = np.arange(-reach, reach + 1) * step
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2) / (bandwidth * np.sqrt(2.0 * np.pi))
    smoothed = signal.fftconvolve(mirrored, kernel, mode="same")[GRID - 1:2 * GRID - 1]
    return np.interp(np.clip(np.asarray(points, np.float64), 0.0, 1.0), grid, np.maximum(smoothed, 0.0))


def inverse_density_weights(tissue_ratio: np.ndarray, label: np.ndarray, num_classes: int,
                            bandwidth: float) -> np.ndarray:
    """Each example's sampling weight `1 / f_y(r)`, scaled to mean 1 within its class, `[M]` float64."""
    tissue_ratio, label = np.asarray(tissue_ratio, np.float64), np.asarray(label)
    if tissue_ratio.shape != label.shape:
        raise ValueError(f"tissue_ratio {tissue_ratio.shape} and label {label.shape} must have one value per example")
    weights = np.zeros(label.shape, np.float64)
    for y in range(num_classes):
        members = label == y
        if members.any():
            inverse = 1.0 / reflected_density(tissue_ratio[members], tissue_ratio[members], bandwidth)
            weights[members] = inverse / inverse.mean()
    return weights


class RatioWeighted(weighted_batch.WeightedBatch):
    """One class-balanced batch, each example drawn with weight 1 / f_y(r) (`method.name = "ratio_weighted"`)."""

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        weights = inverse_density_weights(train["tissue_ratio"], train["label"], len(dataset.CLASS_NAMES),
                                          context.config.method.ratio_weighted.bandwidth)
        self.prepare_weighted(train, attribute, context, weights)

    def describe(self) -> str:
        return (f"{self.plan.describe()}\nratio_weighted trains on one class-balanced batch ({self.plan.batch_size} "
                "examples per step), each example drawn with weight 1 / (density of its tissue ratio within its "
                f"class, bandwidth {self.config.method.ratio_weighted.bandwidth:g}); the taus only name the groups.")
