"""Steps/s of the real training loop against the bare jitted step on the same batches, interleaved.

Writes a DATA_DIR of random uint8 patches (train and validation) into a temporary folder, then for each
method runs `trainer.train_and_evaluate` on it: the `make demo` config (`configs/demo.py`: the tiny
ResNet, 64-pixel patches) with the tf.data input pipeline, device prefetch, the donated state, logging
every `--log-every` steps and an orbax checkpoint every `--checkpoint-every` steps. The loop's time is
taken between two rows of its `metrics.jsonl` (after compilation, before the final evaluation and
save): from the train row of step `--skip` to the train row of the last step, so it covers every cost
the loop pays per step, checkpoints included.

The baseline is the same jitted step (`method.train_step`, compiled apart, with a state of its own)
called back to back on batches of the same pipeline already placed on the device (`--cached-batches`
of them, cycled). The rate of this 2-core machine drifts by 15-25 % within a minute, so the baseline is
not measured before and after the loop but in bursts inside it: every `--burst-every` loop steps the
loop's own work is waited for, `--burst-steps` bare steps run and are timed, and their time is taken
out of the loop's window. Both rates so come from the same minutes. Ratio = loop steps/s / bare
steps/s (target: at least 0.9). Precise BatchNorm is off unless `--precise-bn-batches` is given: its
forward passes at every save are the method's work (like the evaluation, which is outside the timed
window), not the loop's.

  python benchmarks/train_loop.py --methods gerne erm --steps 350

Methods: `gerne` (two gradients), `gerne-folded` (beta folded into the loss, as the demo trains) and
`erm`. Images/s per method give GERNE / ERM per image through the training loop.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import demo
from data_pipeline import shards
from gerne_jax.core import sharding
from gerne_jax.data import dataset, input_pipeline, normalisation
from gerne_jax.methods import registry
from gerne_jax.models import factory
from gerne_jax.runs import run_log
from gerne_jax.train import train_state, train_step, trainer

METHODS = ("gerne", "gerne-folded", "erm")


def write_data_dir(data_dir: pathlib.Path, sizes: dict[str, int], patch_size: int, channels: int) -> None:
    """Random uint8 patches, tumour patches mostly with large tissue ratios (all four groups present)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, size in sizes.items():
        label = np.arange(size) % 2
        large = rng.uniform(size=size) < np.where(label == 1, 0.8, 0.3)
        tissue_ratio = np.where(large, rng.uniform(0.1, 1, size), rng.uniform(0.01, 0.1, size))
        splits[split] = {
            "image": rng.integers(0, 256, (size, patch_size, patch_size, channels), dtype=np.uint8),
            "label": label, "tumour_fraction": label * 0.5, "tissue_ratio": tissue_ratio.astype(np.float32),
            "slide_id": np.array([f"{split}{i % 4}" for i in range(size)]),
            "patient_id": np.array([f"{split}{i % 4}" for i in range(size)]),
            "x": np.arange(size) * patch_size, "y": np.zeros(size, np.int64)}
    shards.write_patch_dataset(data_dir, splits, channel_names=[f"c{i}" for i in range(channels)])


def make_config(method: str, data_dir: pathlib.Path, args: argparse.Namespace) -> ml_collections.ConfigDict:
    config = demo.get_config("erm" if method == "erm" else "gerne")
    config.data.dir = str(data_dir)
    config.method.fold_beta_into_loss = method == "gerne-folded"
    if args.norm:
        config.model.norm = args.norm
    config.training.steps = args.steps
    config.training.eval_every = args.steps  # one evaluation, after the timed window
    config.training.checkpoint_every = args.checkpoint_every
    config.training.log_every = args.log_every
    config.training.precise_bn_batches = args.precise_bn_batches
    return config


class TimedMetricsLog(run_log.MetricsLog):
    """The loop's own metrics log, noting when each train row is written."""

    times: dict[int, float] = {}

    def write(self, step, split, values):
        if split == "train":
            TimedMetricsLog.times[step] = time.perf_counter()
        return super().write(step, split, values)


class BareStep:
    """The method's jitted step from the config's initial state, on cached device batches."""

    def __init__(self, config: ml_collections.ConfigDict, cached_batches: int):
        metadata = dataset.read_metadata(config.data.dir)
        train = input_pipeline.load_split(config.data.dir, "train")
        attribute = dataset.attribute_from_tissue_ratio(train["tissue_ratio"], config.data.taus)
        mesh = sharding.mesh_of(config.mesh)
        method = registry.create(config)
        method.prepare(train, attribute, trainer.Context(config, metadata, mesh))
        model = factory.create_model(config.model)
        self.state = train_state.initial_state(config.model, model, method.optimizer(),
                                               tuple(train["image"].shape[1:]), mesh, config.training.seed)
        self.step = train_step.make_train_step(
            model, mesh, method.gradients(), rows=len(method.rows), with_groups=method.uses_groups,
            divide_loss_by_num_classes=config.method.divide_loss_by_num_classes,
            deterministic_reduction=config.mesh.deterministic_reduction)
        self.norm, self.images_per_step = model.norm, method.examples_per_step
        batches = input_pipeline.train_dataset(
            train["image"], train["label"], method.sampler(config.training.seed), rows=method.rows,
            flips=config.data.flips, rotations=config.data.rotations)
        placed = [sharding.shard_batch(batch, mesh)
                  for batch in itertools.islice(batches.as_numpy_iterator(), cached_batches)]
        standardise = normalisation.Standardiser.of(metadata, mesh)
        self.batches = itertools.cycle([{**batch, "image": standardise(batch["image"])} for batch in placed])
        self.state, _ = jax.block_until_ready(self.step(self.state, next(self.batches)))  # compiles

    def run(self, steps: int) -> None:
        state = self.state
        for batch in itertools.islice(self.batches, steps):
            state, _ = self.step(state, batch)
        self.state = jax.block_until_ready(state)


class InterleavedBursts:
    """Runs timed bursts of the bare step inside the training loop, every `every` of its steps.

    Before a burst the loop's queued work is waited for, so the burst times the bare step alone; the
    loop loses its host/device overlap once per burst, a cost counted against the loop.
    """

    def __init__(self, bare: BareStep, every: int, steps: int):
        self.bare, self.every, self.steps = bare, every, steps
        self.bursts: list[tuple[float, float]] = []

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        calls = itertools.count(1)

        def step_with_bursts(state, batch):
            if next(calls) % self.every == 0:
                jax.block_until_ready(state)
                start = time.perf_counter()
                self.bare.run(self.steps)
                self.bursts.append((start, time.perf_counter()))
            return step(state, batch)

        return step_with_bursts

    def within(self, start: float, end: float) -> list[float]:
        return [stop - begin for begin, stop in self.bursts if start <= begin and stop <= end]


def loop_and_bare_steps_per_second(config: ml_collections.ConfigDict, workdir: pathlib.Path, skip: int,
                                   bursts: InterleavedBursts) -> tuple[float, float]:
    """(loop steps/s without the bursts' time, bare steps/s of the bursts), over steps `skip`..last."""
    TimedMetricsLog.times = {}
    original_log, run_log.MetricsLog = run_log.MetricsLog, TimedMetricsLog
    original_step = train_step.make_train_step
    train_step.make_train_step = lambda *args, **kwargs: bursts.wrap(original_step(*args, **kwargs))
    try:
        registry.train(config, workdir)
    finally:
        run_log.MetricsLog, train_step.make_train_step = original_log, original_step
    last = config.training.steps
    start, end = TimedMetricsLog.times[skip], TimedMetricsLog.times[last]
    burst_times = bursts.within(start, end)
    loop = (last - skip) / (end - start - sum(burst_times))
    return loop, len(burst_times) * bursts.steps / sum(burst_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["gerne", "erm"])
    parser.add_argument("--norm", default="", help="model.norm (default: the demo config's)")
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--skip", type=int, default=50, help="steps before the timed window (a log step)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--precise-bn-batches", type=int, default=0,
                        help="training.precise_bn_batches (the demo's GERNE config: 20): forward passes at every "
                             "save, the method's work rather than the loop's, so off by default")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--examples", type=int, default=2048, help="training patches written")
    parser.add_argument("--cached-batches", type=int, default=16)
    parser.add_argument("--burst-every", type=int, default=20, help="loop steps between bursts of the bare step")
    parser.add_argument("--burst-steps", type=int, default=10, help="bare steps per burst")
    args = parser.parse_args()
    if args.skip % args.log_every or args.steps % args.log_every or not 0 < args.skip < args.steps:
        parser.error("--skip and --steps must be multiples of --log-every with 0 < skip < steps")
    if not 0 < args.burst_every < args.steps - args.skip or args.burst_steps < 1:
        parser.error("--burst-every must lie within the timed window and --burst-steps be positive")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = pathlib.Path(tmp) / "data"
        write_data_dir(data_dir, {"train": args.examples, "validation": 256}, args.patch_size, args.channels)
        for method in args.methods:
            config = make_config(method, data_dir, args)
            bare = BareStep(config, args.cached_batches)
            bursts = InterleavedBursts(bare, args.burst_every, args.burst_steps)
            loop, bare_rate = loop_and_bare_steps_per_second(config, pathlib.Path(tmp) / f"run_{method}", args.skip,
                                                             bursts)
            rows.append((method, bare.norm, bare.images_per_step, loop, bare_rate))

    print(f"devices: {jax.devices()}  tiny ResNet, {args.patch_size}px x {args.channels} channels; loop steps "
          f"{args.skip}-{args.steps} (checkpoint every {args.checkpoint_every}, log every {args.log_every}); "
          f"{args.burst_steps} bare steps every {args.burst_every} loop steps")
    header = (f"{'method':<13} {'norm':<8} {'img/step':>8} {'loop steps/s':>13} {'bare steps/s':>13} "
              f"{'loop/bare':>9} {'loop img/s':>11}")
    print(header)
    print("-" * len(header))
    for method, norm, images, loop, bare in rows:
        print(f"{method:<13} {norm:<8} {images:>8} {loop:>13.2f} {bare:>13.2f} {loop / bare:>9.2f} "
              f"{loop * images:>11.0f}")


if __name__ == "__main__":
    main()
