"""Times the GERNE train step against the ERM step on the same number of images per step.

GERNE: a paired batch [2, B, P, P, C] (both per-batch gradients, `extrapolate` in the optimiser);
fast path: the same batch with beta folded into the loss; ERM: one batch [1, 2B, P, P, C]. All three
use the one optimiser (`extrapolation.make_optimizer`) and the jitted, mesh-sharded step with a donated
state, as training does. For each model and norm mode it prints images/s and the time ratio GERNE / ERM
(target for the default `group` norm: at most 1.15). Each figure is the median of a few timed steps
after a warm-up (compilation) step; on a shared CPU the numbers are noisy.

  python benchmarks/train_step.py --models tiny resnet50 --batch-per-group 64 16

The mesh spans all devices, so B must be a multiple of the device count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from jax.sharding import Mesh

from gerne_jax import extrapolation, models, sharding, train_state
from gerne_jax import train_step as ts

LEARNING_RATE, BETA = 1e-3, 1.0


def _batch(rows: int, batch_size: int, patch_size: int, channels: int,
           num_classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(rows, batch_size, patch_size, patch_size, channels)
                                ).astype(np.float32),
            "label": rng.integers(0, num_classes, size=(rows, batch_size)).astype(np.int32)}


def _time_step(model: models.ResNet, batch: dict[str, np.ndarray], mesh: Mesh, *, fold: bool,
               timed_steps: int) -> float:
    """Median seconds per step (after one warm-up step that includes compilation)."""
    paired = batch["image"].shape[0] == 2
    tx = extrapolation.make_optimizer(LEARNING_RATE, BETA, weight_decay=0.01)
    state = train_state.create_train_state(jax.random.key(0), model, (1, *batch["image"].shape[2:]), tx)
    state = sharding.replicate(state, mesh)
    step = ts.make_train_step(model, mesh, paired=paired, fold_beta=BETA if fold else None)
    device_batch = sharding.shard_batch(batch, mesh)
    state, _ = jax.block_until_ready(step(state, device_batch))
    durations = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, device_batch))
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def measure_step_rate(model: str, patch_size: int, batch_per_group: int, channels: int = 3,
                      timed_steps: int = 3) -> float:
    """Images per second of the two-gradient GERNE step (group norm, 2 x batch_per_group images)."""
    net = models.create_model(model, num_classes=2, norm="group")
    batch = _batch(2, batch_per_group, patch_size, channels, num_classes=2)
    seconds = _time_step(net, batch, sharding.make_mesh(), fold=False, timed_steps=timed_steps)
    return 2 * batch_per_group / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "resnet50"])
    parser.add_argument("--batch-per-group", nargs="+", type=int, default=[64, 16],
                        help="B per model (GERNE: 2 x B images per step, ERM: one batch of 2B)")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--norms", nargs="+", default=list(models.NORM_MODES))
    parser.add_argument("--timed-steps", type=int, default=3)
    args = parser.parse_args()
    if len(args.batch_per_group) != len(args.models):
        parser.error("give one --batch-per-group value per model")

    mesh = sharding.make_mesh()
    print(f"devices: {jax.devices()}  patch {args.patch_size}px x {args.channels} channels, "
          f"median of {args.timed_steps} steps after warm-up")
    header = (f"{'model':<9} {'norm':<9} {'B':>4} {'ERM img/s':>10} {'GERNE img/s':>12} "
              f"{'ratio':>6} {'fast img/s':>11} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name, batch_per_group in zip(args.models, args.batch_per_group):
        paired = _batch(2, batch_per_group, args.patch_size, args.channels, num_classes=2)
        single = {key: value.reshape(1, 2 * batch_per_group, *value.shape[2:])
                  for key, value in paired.items()}
        images = 2 * batch_per_group
        for norm in args.norms:
            model = models.create_model(name, num_classes=2, norm=norm)
            erm = _time_step(model, single, mesh, fold=False, timed_steps=args.timed_steps)
            gerne = _time_step(model, paired, mesh, fold=False, timed_steps=args.timed_steps)
            fast = _time_step(model, paired, mesh, fold=True, timed_steps=args.timed_steps)
            print(f"{name:<9} {norm:<9} {batch_per_group:>4} {images / erm:>10.1f} "
                  f"{images / gerne:>12.1f} {gerne / erm:>6.2f} {images / fast:>11.1f} "
                  f"{fast / erm:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
