"""`benchmarks/train_loop.py` on tiny sizes: the bare step's bursts run inside the loop's timed window,
as many as the schedule puts there, and their time is taken out of the loop's, so the benchmark never rots."""
from __future__ import annotations

import argparse

import pytest

from tests import benchmark_scripts


def test_bursts_fall_in_the_window_and_leave_the_loop_its_own_time(tmp_path):
    benchmark = benchmark_scripts.load("train_loop")
    data_dir = tmp_path / "data"
    benchmark.write_data_dir(data_dir, {"train": 64, "validation": 32}, patch_size=32, channels=3)
    args = argparse.Namespace(norm="", steps=30, checkpoint_every=10, log_every=10, precise_bn_batches=0)
    config = benchmark.make_config("erm", data_dir, args)
    config.training.batch_per_group = 4
    bare = benchmark.BareStep(config, cached_batches=2)
    bursts = benchmark.InterleavedBursts(bare, every=5, steps=2)

    loop, bare_rate = benchmark.loop_and_bare_steps_per_second(config, tmp_path / "run", 10, bursts)

    # A burst runs before the loop's calls 5, 10, ..., 30; the window runs from the row of step 10 (written
    # after call 10) to the row of step 30 (after call 30): the bursts before calls 15, 20, 25 and 30.
    assert len(bursts.bursts) == 6
    times = benchmark.TimedMetricsLog.times
    inside = bursts.within(times[10], times[30])
    assert len(inside) == 4
    window = times[30] - times[10]
    assert loop == pytest.approx(20 / (window - sum(inside)))
    assert bare_rate == pytest.approx(4 * 2 / sum(inside))
    assert 0 < sum(inside) < window
