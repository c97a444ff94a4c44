"""Times the GERNE train step against the ERM step on the same number of images per step.

GERNE: a paired batch [2, B, P, P, C] (both per-batch gradients, `extrapolate` in the optimiser);
folded: the same batch with beta folded into the loss (one gradient); ERM: one batch [1, 2B, P, P, C].
All three use the one optimiser (`extrapolation.make_optimizer`) and the jitted, mesh-sharded step with
a donated state, as training does. For each model and norm mode the three steps are compiled first,
then timed in interleaved rounds (ERM, GERNE, folded, `--steps-per-round` steps each, the order rotating
from round to round), so that a load change on a shared machine hits all three alike. A ratio is the
median over rounds of the round's time ratio (GERNE / ERM: target at most 1.15); images/s are medians
over rounds too.

  python benchmarks/train_step.py --models tiny resnet50 --batch-per-group 64 16

The mesh spans all devices, so B must be a multiple of the device count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core import sharding
from gerne_jax.models import resnet
from gerne_jax.train import extrapolation, train_state
from gerne_jax.train import train_step as ts

LEARNING_RATE, BETA = 1e-3, 1.0
KINDS = ("erm", "gerne", "folded")


def make_batch(rows: int, batch_size: int, patch_size: int, channels: int,
               num_classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(rows, batch_size, patch_size, patch_size, channels)
                                ).astype(np.float32),
            "label": rng.integers(0, num_classes, size=(rows, batch_size)).astype(np.int32)}


def compiled_runner(model: resnet.ResNet, batch: dict[str, np.ndarray], mesh: Mesh, *,
                    fold: bool) -> Callable[[int], float]:
    """Compiles the step (one warm-up step) and returns `run(steps) -> seconds` for that many steps."""
    paired = batch["image"].shape[0] == 2
    tx = extrapolation.make_optimizer(LEARNING_RATE, BETA, weight_decay=0.01)
    state = train_state.create_train_state(jax.random.key(0), model, (1, *batch["image"].shape[2:]), tx)
    state = sharding.replicate(state, mesh)
    gradients = (ts.folded(BETA) if fold else ts.two_gradients) if paired else ts.single_batch
    step = ts.make_train_step(model, mesh, gradients, rows=2 if paired else 1)
    device_batch = sharding.shard_batch(batch, mesh)
    holder = [jax.block_until_ready(step(state, device_batch))[0]]

    def run(steps: int) -> float:
        start = time.perf_counter()
        state = holder[0]
        for _ in range(steps):
            state, _ = step(state, device_batch)
        holder[0] = jax.block_until_ready(state)
        return time.perf_counter() - start

    return run


def interleaved_seconds(runners: dict[str, Callable[[int], float]], rounds: int,
                        steps_per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each runner in each round; the order rotates from round to round."""
    names = list(runners)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(runners[name](steps_per_round) / steps_per_round)
    return seconds


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def measure_step_rate(model: str, patch_size: int, batch_per_group: int, channels: int = 3,
                      timed_steps: int = 3) -> float:
    """Images per second of the two-gradient GERNE step (group norm, 2 x batch_per_group images)."""
    net = resnet.create_model(model, num_classes=2, norm="group")
    batch = make_batch(2, batch_per_group, patch_size, channels, num_classes=2)
    run = compiled_runner(net, batch, sharding.make_mesh(), fold=False)
    return 2 * batch_per_group * timed_steps / run(timed_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "resnet50"])
    parser.add_argument("--batch-per-group", nargs="+", type=int, default=[64, 16],
                        help="B per model (GERNE: 2 x B images per step, ERM: one batch of 2B)")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--norms", nargs="+", default=list(resnet.NORM_MODES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    args = parser.parse_args()
    if len(args.batch_per_group) != len(args.models):
        parser.error("give one --batch-per-group value per model")

    mesh = sharding.make_mesh()
    print(f"devices: {jax.devices()}  patch {args.patch_size}px x {args.channels} channels; "
          f"{args.rounds} interleaved rounds of {args.steps_per_round} steps per kind, medians over rounds")
    header = (f"{'model':<9} {'norm':<9} {'B':>4} {'ERM img/s':>10} {'GERNE img/s':>12} "
              f"{'ratio':>6} {'folded img/s':>13} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name, batch_per_group in zip(args.models, args.batch_per_group):
        paired = make_batch(2, batch_per_group, args.patch_size, args.channels, num_classes=2)
        single = {key: value.reshape(1, 2 * batch_per_group, *value.shape[2:])
                  for key, value in paired.items()}
        images = 2 * batch_per_group
        for norm in args.norms:
            model = resnet.create_model(name, num_classes=2, norm=norm)
            runners = {"erm": compiled_runner(model, single, mesh, fold=False),
                       "gerne": compiled_runner(model, paired, mesh, fold=False),
                       "folded": compiled_runner(model, paired, mesh, fold=True)}
            seconds = interleaved_seconds(runners, args.rounds, args.steps_per_round)
            rate = {kind: images / statistics.median(seconds[kind]) for kind in KINDS}
            print(f"{name:<9} {norm:<9} {batch_per_group:>4} {rate['erm']:>10.1f} {rate['gerne']:>12.1f} "
                  f"{median_ratio(seconds['gerne'], seconds['erm']):>6.2f} {rate['folded']:>13.1f} "
                  f"{median_ratio(seconds['folded'], seconds['erm']):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
