"""One-shot accelerator benchmark: train-step images/s, model FLOPs utilisation and memory, per dtype.

For ResNet-50 on 224-pixel patches (3 channels, 2 classes) in bfloat16 and float32, four steps on the
same images per step, all with the one optimiser and a donated state:

- `erm`: one batch of 2B images (the jitted single-batch step);
- `gerne`: a pair of B + B, both per-batch gradients in one jitted step (`extrapolate` combines them);
- `folded`: the pair with beta folded into the loss (one gradient);
- `two-pass`: the official PyTorch order: a jitted forward/backward call on the biased batch, another on
  the less-biased batch, then a jitted optimiser update (three calls per step). Only for the norm modes
  whose batches are independent (frozen, group).

Every function is compiled first (in parallel threads), then the kinds are timed in interleaved rounds;
figures are medians over rounds. MFU = the compiled step's FLOPs (XLA's `cost_analysis()`) per second
over the card's peak (`PEAK_FLOPS`, by device kind; float32 against the TF32 tensor-core peak on NVIDIA
cards, XLA's default precision there; "unknown" for other devices, e.g. CPUs). Memory: XLA's estimate for
each compiled step (arguments + outputs + temporaries) and the device's peak bytes in use
(`memory_stats()`, where the backend reports it). The model part feeds in-memory arrays and imports no
TensorFlow; the input pipeline's paired patches/s from array_record shards (`benchmarks/input_pipeline.py`)
is measured only where TensorFlow is installed. Prints a table and writes JSON (`--out`).

  python benchmarks/device.py --out device.json          # on a GPU/TPU: a few minutes
  python benchmarks/device.py --smoke --out smoke.json   # tiny sizes, any CPU
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import json
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from gerne_jax.core import files, sharding
from gerne_jax.models import resnet
from gerne_jax.train import extrapolation, train_state
from gerne_jax.train import train_step as ts

BETA, LEARNING_RATE = 1.0, 1e-3
KINDS = ("erm", "gerne", "folded", "two-pass")
# Dense peak FLOP/s per chip by compute dtype, matched by substring of `device_kind` (first match wins).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIE": {"bfloat16": 756e12, "float32": 378e12},
    "H200": {"bfloat16": 989e12, "float32": 495e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    # TPUs: float32 matmuls run as bfloat16 passes at XLA's default precision.
    "TPU V4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU V5 LITE": {"bfloat16": 197e12, "float32": 197e12},
    "TPU V5E": {"bfloat16": 197e12, "float32": 197e12},
    "TPU V5P": {"bfloat16": 459e12, "float32": 459e12},
    "TPU V5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU V6 LITE": {"bfloat16": 918e12, "float32": 918e12},
    "TPU V6E": {"bfloat16": 918e12, "float32": 918e12},
}
# The smoke run's model: one basic block of 4 channels, the smallest ResNet with every kind of layer.
ONE_BLOCK = functools.partial(resnet.ResNet, stage_sizes=(1,), block_cls=resnet.BasicBlock, num_filters=4)
SIZES = {  # model, patch size, B (images per batch of the pair), timed rounds, steps per round, pipeline
    "full": dict(model="resnet50", patch_size=224, batch_per_group=128, rounds=3, steps_per_round=10,
                 pipeline_examples=1024, pipeline_patch_size=224, pipeline_batch_per_group=32,
                 pipeline_steps=20),
    "smoke": dict(model="one-block", patch_size=16, batch_per_group=4, rounds=2, steps_per_round=1,
                  pipeline_examples=64, pipeline_patch_size=16, pipeline_batch_per_group=2, pipeline_steps=2),
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak FLOP/s for `dtype`, or None ("unknown") for a device not in `PEAK_FLOPS`."""
    kind = device_kind.upper()
    for key, peaks in PEAK_FLOPS.items():
        if key in kind:
            return peaks[dtype]
    return None


def _flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older JAX versions
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def _memory_bytes(compiled: Any) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


class Kind:
    """One kind of step: its lowered functions, then compiled, then `run(steps)` in seconds."""

    def __init__(self, name: str, model: resnet.ResNet, paired: dict[str, jax.Array], mesh: jax.sharding.Mesh):
        self.name = name
        tx = extrapolation.make_optimizer(LEARNING_RATE, BETA, weight_decay=0.01)
        state = train_state.create_train_state(jax.random.key(0), model,
                                               (1, *paired["image"].shape[2:]), tx)
        self.state = sharding.replicate(state, mesh)
        if name == "two-pass":
            self._lower_two_pass(model, paired)
            return
        batch = paired
        if name == "erm":
            batch = {key: value.reshape(1, -1, *value.shape[2:]) for key, value in paired.items()}
        self.batch = sharding.shard_batch(batch, mesh)
        gradients = {"erm": ts.single_batch, "folded": ts.folded(BETA)}.get(name, ts.two_gradients)
        step = ts.make_train_step(model, mesh, gradients, rows=1 if name == "erm" else 2)
        self.lowered = [step.lower(self.state, self.batch)]

    def _lower_two_pass(self, model: resnet.ResNet, paired: dict[str, jax.Array]) -> None:
        def gradient(params, batch_stats, images, labels):
            variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
            return jax.grad(lambda p: ts.classification_loss(
                model.apply({**variables, "params": p}, images, train=True), labels))(params)

        def update(state, g_b, g_lb):
            return state.apply_gradients(grads=g_lb, optimizer_args={"biased_updates": g_b})

        self.rows = [(jax.device_put(paired["image"][r]), jax.device_put(paired["label"][r])) for r in range(2)]
        grad_fn = jax.jit(gradient)
        grads = jax.eval_shape(grad_fn, self.state.params, self.state.batch_stats, *self.rows[0])
        self.lowered = [grad_fn.lower(self.state.params, self.state.batch_stats, *self.rows[0]),
                        jax.jit(update, donate_argnums=0).lower(self.state, grads, grads)]

    def compile(self) -> None:
        self.compiled = [lowered.compile() for lowered in self.lowered]
        self.flops = (2 * _flops(self.compiled[0]) + _flops(self.compiled[1]) if self.name == "two-pass"
                      else _flops(self.compiled[0]))
        memory = [_memory_bytes(c) for c in self.compiled]
        self.memory_bytes = None if None in memory else max(memory)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        state = self.state
        for _ in range(steps):
            if self.name == "two-pass":
                grad_fn, update = self.compiled
                g_b = grad_fn(state.params, state.batch_stats, *self.rows[0])
                g_lb = grad_fn(state.params, state.batch_stats, *self.rows[1])
                state = update(state, g_b, g_lb)
            else:
                state, _ = self.compiled[0](state, self.batch)
        self.state = jax.block_until_ready(state)
        return time.perf_counter() - start


def benchmark_steps(model_name: str, norm: str, dtype: str, patch_size: int, batch_per_group: int,
                    rounds: int, steps_per_round: int, mesh: jax.sharding.Mesh) -> list[dict[str, Any]]:
    """One row per kind of step: images/s, time per image relative to ERM, FLOPs, MFU, memory."""
    model = (ONE_BLOCK(num_classes=2, norm=norm, dtype=dtype) if model_name == "one-block" else
             resnet.create_model(model_name, num_classes=2, norm=norm, dtype=dtype))
    rng = np.random.default_rng(0)
    paired = {"image": rng.normal(size=(2, batch_per_group, patch_size, patch_size, 3)).astype(np.float32),
              "label": rng.integers(0, 2, size=(2, batch_per_group)).astype(np.int32)}
    names = [k for k in KINDS if k != "two-pass" or norm not in resnet.TRAIN_MODE_BATCH_NORM]
    kinds = {name: Kind(name, model, paired, mesh) for name in names}
    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:  # XLA compiles outside the GIL
        list(pool.map(Kind.compile, kinds.values()))
    for kind in kinds.values():  # warm-up, one kind at a time (their activations need not fit together)
        kind.run(1)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(kinds[name].run(steps_per_round) / steps_per_round)
    images = 2 * batch_per_group
    peak = peak_flops(jax.devices()[0].device_kind, dtype)
    rows = []
    for name, kind in kinds.items():
        step_seconds = statistics.median(seconds[name])
        achieved = kind.flops / step_seconds
        rows.append({
            "dtype": dtype, "kind": name, "images_per_step": images, "images_per_second": images / step_seconds,
            "time_vs_erm": statistics.median(a / b for a, b in zip(seconds[name], seconds["erm"], strict=True)),
            "flops_per_step": kind.flops, "achieved_flops_per_second": achieved,
            "mfu": achieved / peak if peak else None, "xla_memory_bytes": kind.memory_bytes})
    return rows


def pipeline_patches_per_second(examples: int, patch_size: int, batch_per_group: int, steps: int) -> dict[str, Any]:
    """Paired patches/s of the tf.data pipeline reading array_record shards, or why it was skipped."""
    if importlib.util.find_spec("tensorflow") is None:
        return {"patches_per_second": None, "skipped": "TensorFlow is not installed on this host"}
    spec = importlib.util.spec_from_file_location("input_pipeline_benchmark",
                                                  pathlib.Path(__file__).with_name("input_pipeline.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from gerne_jax.data import input_pipeline  # TensorFlow, only here
    with tempfile.TemporaryDirectory() as tmp:
        bench.write_data_dir(pathlib.Path(tmp), examples, patch_size, 3)
        split = input_pipeline.load_split(tmp, "train", in_memory=False)
        rate = bench.paired_patches_per_second(split, batch_per_group, steps, 0.1, "array_record")
    return {"patches_per_second": rate, "patch_size": patch_size, "batch_per_group": batch_per_group}


def _gigabytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, for CPUs and tests")
    parser.add_argument("--out", default="device_benchmark.json", help="JSON file written")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--norm", default="frozen", choices=resnet.NORM_MODES)
    parser.add_argument("--batch-per-group", type=int, help="B, images per batch of the pair (ERM: 2B)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline measure")
    args = parser.parse_args(argv)
    size = dict(SIZES["smoke" if args.smoke else "full"])
    if args.batch_per_group:
        size["batch_per_group"] = args.batch_per_group
    device = jax.devices()[0]
    mesh = sharding.make_mesh(1)  # one chip: MFU and memory are per chip
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        rows += benchmark_steps(size["model"], args.norm, dtype, size["patch_size"], size["batch_per_group"],
                                size["rounds"], size["steps_per_round"], mesh)
    memory_stats = device.memory_stats() or {}
    pipeline = ({"patches_per_second": None, "skipped": "--no-pipeline"} if args.no_pipeline else
                pipeline_patches_per_second(size["pipeline_examples"], size["pipeline_patch_size"],
                                            size["pipeline_batch_per_group"], size["pipeline_steps"]))
    result = {"device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "host": platform.node(), "model": size["model"], "norm": args.norm, "patch_size": size["patch_size"],
              "batch_per_group": size["batch_per_group"], "smoke": args.smoke,
              "peak_flops": {dtype: peak_flops(device.device_kind, dtype) for dtype in args.dtypes},
              "peak_bytes_in_use": memory_stats.get("peak_bytes_in_use"), "steps": rows,
              "input_pipeline": pipeline, "seconds": time.perf_counter() - start}
    files.write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")

    print(f"{device.device_kind} ({device.platform}), {size['model']} norm={args.norm}, "
          f"{size['patch_size']}px, B={size['batch_per_group']} (2B images per step)")
    header = (f"{'dtype':<9} {'kind':<9} {'img/s':>9} {'time/ERM':>8} {'GFLOP/step':>11} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'XLA mem GB':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        mfu = "unknown" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{row['dtype']:<9} {row['kind']:<9} {row['images_per_second']:>9.1f} {row['time_vs_erm']:>8.2f} "
              f"{row['flops_per_step'] / 1e9:>11.1f} {row['achieved_flops_per_second'] / 1e12:>8.3f} "
              f"{mfu:>7} {_gigabytes(row['xla_memory_bytes']):>10}")
    print(f"device peak memory in use: {_gigabytes(result['peak_bytes_in_use'])} GB")
    if pipeline["patches_per_second"] is None:
        print(f"input pipeline: skipped ({pipeline['skipped']})")
    else:
        print(f"input pipeline (array_record, {pipeline['patch_size']}px, B={pipeline['batch_per_group']}): "
              f"{pipeline['patches_per_second']:.0f} paired patches/s")
    print(f"total {result['seconds']:.0f} s; JSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
