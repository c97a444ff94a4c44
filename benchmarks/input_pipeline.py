"""Paired-batch input pipeline throughput, beside the train step's consumption rate.

For each patch size, writes a small DATA_DIR with `data_pipeline.shards.write_patch_dataset` (uint8,
3 channels) into a temporary folder, then times `input_pipeline.train_dataset` reading it in memory and
lazily from the array_record shards. Prints paired patches per second (both batches of a step count:
2 * N per step) next to `benchmarks/train_step.py`'s `measure_step_rate` (images/s) when that exists.
The step rate is measured with `--step-batch` images per batch (small, to keep CPU runs short); images/s
depends little on the batch size once the batch fills the device.

    .venv/bin/python benchmarks/input_pipeline.py --patch-sizes 64 128 --steps 100
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import tempfile
import time

import numpy as np
import tqdm

from data_pipeline import shards
from gerne_jax.data import dataset, groups, input_pipeline, samplers


def write_data_dir(data_dir: pathlib.Path, num_examples: int, patch_size: int, channels: int) -> None:
    """Random uint8 patches with a tissue-size shortcut (tumour patches mostly full of tissue)."""
    rng = np.random.default_rng(0)
    label = (rng.uniform(size=num_examples) < 0.4).astype(np.int64)
    large = rng.uniform(size=num_examples) < np.where(label == 1, 0.9, 0.2)
    tissue_ratio = np.where(large, rng.uniform(0.1, 1, num_examples), rng.uniform(0.01, 0.1, num_examples))
    train = {"image": rng.integers(0, 256, (num_examples, patch_size, patch_size, channels), dtype=np.uint8),
             "label": label, "tumour_fraction": label * 0.5, "tissue_ratio": tissue_ratio.astype(np.float32),
             "slide_id": np.array(["bench"] * num_examples), "patient_id": np.array(["bench"] * num_examples),
             "x": np.arange(num_examples) * patch_size, "y": np.zeros(num_examples, np.int64)}
    shards.write_patch_dataset(data_dir, {"train": train}, channel_names=[f"c{i}" for i in range(channels)])


def paired_patches_per_second(split: dict, batch_per_group: int, steps: int, tau: float, label: str) -> float:
    attribute = dataset.attribute_from_tissue_ratio(split["tissue_ratio"], [tau])
    plan = groups.make_batch_plan(dataset.group_counts(split["label"], attribute, 2, 2), c=0.5, beta=1.0,
                                  batch_per_group=batch_per_group)
    batches = input_pipeline.train_dataset(
        split["image"], split["label"], samplers.PairedIndexSampler(plan, split["label"], attribute, seed=0),
        process_index=0, process_count=1).as_numpy_iterator()
    for _ in range(5):                                   # warm-up: tracing, thread pools, prefetch
        next(batches)
    start = time.perf_counter()
    for _ in tqdm.trange(steps, desc=label, leave=False):
        next(batches)
    return steps * 2 * plan.batch_size / (time.perf_counter() - start)


def load_step_rate():
    """`measure_step_rate` from benchmarks/train_step.py, or None when that benchmark is absent."""
    path = pathlib.Path(__file__).with_name("train_step.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "measure_step_rate", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--examples", type=int, default=1024, help="patches written per DATA_DIR")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-per-group", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--model", default="resnet50", help="model for the train-step rate")
    parser.add_argument("--step-batch", type=int, default=8, help="images per batch for the train-step rate")
    parser.add_argument("--no-train-step", action="store_true", help="skip the train-step rate")
    args = parser.parse_args()

    measure_step_rate = None if args.no_train_step else load_step_rate()
    rows = []
    for patch_size in args.patch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = pathlib.Path(tmp)
            write_data_dir(data_dir, args.examples, patch_size, args.channels)
            rates = {}
            for in_memory in (True, False):
                split = input_pipeline.load_split(data_dir, "train", in_memory=in_memory)
                name = "in memory" if in_memory else "array_record"
                rates[name] = paired_patches_per_second(split, args.batch_per_group, args.steps, args.tau,
                                                        f"P={patch_size} {name}")
        step_rate = (measure_step_rate(args.model, patch_size, args.step_batch, args.channels)
                     if measure_step_rate else float("nan"))
        rows.append((patch_size, rates["in memory"], rates["array_record"], step_rate))

    print(f"batch_per_group={args.batch_per_group} (N = {4 * args.batch_per_group} per batch, "
          f"{8 * args.batch_per_group} paired patches per step), {args.channels} channels uint8")
    print(f"{'patch':>6} {'in-memory patches/s':>20} {'array_record patches/s':>23} "
          f"{'train step ' + args.model + ' images/s':>28}   (step: 2 x {args.step_batch} images)")
    for patch_size, memory_rate, record_rate, step_rate in rows:
        print(f"{patch_size:>6} {memory_rate:>20.0f} {record_rate:>23.0f} {step_rate:>28.1f}")
    if measure_step_rate is None and not args.no_train_step:
        print("benchmarks/train_step.py with measure_step_rate is not present: no train-step rate.")


if __name__ == "__main__":
    main()
