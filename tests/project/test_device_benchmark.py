"""`benchmarks/device.py --smoke` runs on a CPU, prints its table and writes a JSON whose figures agree
with each other and with a hand count of the tiny ResNet's FLOPs, so the accelerator benchmark never rots."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import benchmark_scripts
from tests.helpers import REPO as ROOT

SCRIPT = ROOT / "benchmarks" / "device.py"



def _valid_taps(size: int, kernel: int, stride: int, pad: int) -> int:
    """Kernel taps that land inside the input, summed over one spatial axis of a conv's outputs (XLA's
    cost analysis does not count the multiply-adds with zero padding)."""
    outputs = (size + 2 * pad - kernel) // stride + 1
    return sum(0 <= stride * o - pad + j < size for o in range(outputs) for j in range(kernel))


# Multiply-adds of one 16x16x3 image through the smoke run's one-block ResNet (4 channels), layer by
# layer: valid taps (both spatial axes) x output channels x input channels.
STEM_MACS = _valid_taps(16, 7, 2, 3) ** 2 * 4 * 3        # conv 7x7 stride 2: 16 -> 8 px (max pool -> 4)
BLOCK_MACS = 2 * _valid_taps(4, 3, 1, 1) ** 2 * 4 * 4    # layer1_0: two 3x3 convs, 4 -> 4 channels at 4 px
FC_MACS = 4 * 2
# Training: the forward pass, the stem's weight gradient (the images are not differentiated) and both
# the input and the weight gradients of the other layers.
TRAIN_MACS = STEM_MACS + BLOCK_MACS + FC_MACS + STEM_MACS + 2 * (BLOCK_MACS + FC_MACS)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_run_reports_every_kind_and_dtype(smoke_run):
    stdout, result = smoke_run
    assert result["smoke"] and result["model"] == "one-block" and result["norm"] == "frozen"
    rows = {(row["dtype"], row["kind"]): row for row in result["steps"]}
    assert set(rows) == {(d, k) for d in ("bfloat16", "float32") for k in ("erm", "gerne", "folded", "two-pass")}
    for (dtype, kind), row in rows.items():
        assert row["images_per_step"] == 2 * result["batch_per_group"]
        assert row["images_per_second"] > 0 and row["flops_per_step"] > 0
        seconds_per_step = row["images_per_step"] / row["images_per_second"]
        assert row["achieved_flops_per_second"] == pytest.approx(row["flops_per_step"] / seconds_per_step)
        assert row["mfu"] is None  # a CPU has no entry in the peak table: "unknown"
        assert f"{dtype:<9} {kind:<9}" in stdout
    assert "unknown" in stdout and "input pipeline" in stdout
    assert rows[("float32", "erm")]["time_vs_erm"] == pytest.approx(1.0)
    assert result["input_pipeline"]["patches_per_second"] > 0  # TensorFlow is installed for the tests


@pytest.mark.slow
def test_smoke_flops_match_a_hand_count(smoke_run):
    _, result = smoke_run
    rows = {(row["dtype"], row["kind"]): row for row in result["steps"]}
    # Two FLOPs per multiply-add, plus elementwise work (norms, activations, loss, optimiser).
    erm = rows[("float32", "erm")]["flops_per_step"]
    assert 2 * TRAIN_MACS <= erm / (2 * result["batch_per_group"]) <= 1.5 * 2 * TRAIN_MACS
    for kind in ("gerne", "folded", "two-pass"):  # the same images: the same convolutions
        assert rows[("float32", kind)]["flops_per_step"] == pytest.approx(erm, rel=0.25)


def test_peak_flops_table():
    device = benchmark_scripts.load("device")
    assert device.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert device.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
    assert device.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert device.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12
    assert device.peak_flops("TPU v4", "bfloat16") == 275e12
    assert device.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert device.peak_flops("TPU v5p", "bfloat16") == 459e12
    assert device.peak_flops("cpu", "float32") is None
