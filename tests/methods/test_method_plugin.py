"""A training method from outside the package: registered by name, trained by `gerne-jax train` unchanged.

`ToyMethod` lives in this file only. It trains plain cross-entropy on the less-biased row of GERNE's
paired draws with c = 1 (group-balanced batches; no built-in method trains on that row alone with the
mean loss), through the shared loop, so the test shows that a method is the class and nothing else:
no name of it anywhere in the package.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from gerne_jax.data import dataset, samplers
from gerne_jax.data.groups import LESS_BIASED
from gerne_jax.methods import registry
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.train import method, train_step, trainer
from tests.helpers import REPO as ROOT
from tests.helpers import train_command

TOY = "toy"


class ToyMethod(method.Method):
    """Mean cross-entropy on the group-balanced row of the paired draws."""

    prepared: list[ToyMethod] = []  # the instances the command prepared, for the test to inspect

    def prepare(self, train: dict[str, Any], attribute: np.ndarray, context: trainer.Context) -> None:
        self.config, self.attribute, self.label = context.config, attribute, train["label"]
        self.plan = method.batch_plan(self.config, self.label, attribute, c=1.0, beta=0.0)
        ToyMethod.prepared.append(self)

    def sampler(self, seed: int) -> samplers.StepSampler:
        return samplers.PairedIndexSampler(self.plan, self.label, self.attribute, seed)

    @property
    def rows(self) -> tuple[int, ...]:
        return (LESS_BIASED,)

    def gradients(self) -> train_step.GradientFn:
        return train_step.single_batch

    def describe(self) -> str:
        return f"{self.plan.describe()}\ntoy: the less-biased batch alone (c = 1), plain cross-entropy."


@pytest.fixture
def toy_registered(monkeypatch):
    """`registry.register("toy", ToyMethod)` for one test (the registry's table restored after it)."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    registry.register(TOY, ToyMethod)
    ToyMethod.prepared.clear()


@pytest.mark.slow
def test_a_registered_method_trains_through_thetrain_command(toy_registered, tiny_data, tmp_path):
    workdir = tmp_path / "toy"
    status = train_command(["--config", "tiny:erm", f"--config.method.name={TOY}",
                             f"--config.data.dir={tiny_data.path}", f"--workdir={workdir}"])
    assert status == 0
    (toy,) = ToyMethod.prepared
    assert run_log.read_config(workdir).method.name == TOY
    steps = run_log.read_config(workdir).training.steps
    rows = [json.loads(line) for line in (workdir / run_log.METRICS_FILE).read_text().splitlines()]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, steps + 1))  # log_every = 1
    # Its single batch's metrics: a finite mean cross-entropy, not the pair's.
    assert all(np.isfinite(row["loss"]) and "loss_less_biased" not in row for row in train_rows)
    assert {row["step"] for row in rows if row["split"] == "validation"} == {2, 4}  # eval_every = 2
    # Its batches: the group-balanced row, K * A * B examples per step (the images/s counts them).
    expected = dataset.group_counts(toy.label, toy.attribute, 2, 2)
    np.testing.assert_array_equal(toy.plan.group_counts, expected)
    np.testing.assert_array_equal(toy.plan.less_biased_counts, np.full((2, 2), toy.plan.batch_per_group))
    assert toy.examples_per_step == toy.plan.batch_size
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        assert run.latest_step() == steps
    finally:
        run.close()


def test_an_unknown_method_name_is_one_error_line_naming_the_choices(tiny_data, tmp_path):
    """In a process of its own: absl defines the `--config.KEY` flags once per process."""
    workdir = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "gerne_jax", "train", "--config", "tiny:erm", "--config.method.name=bogus",
         f"--config.data.dir={tiny_data.path}", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert completed.returncode == 2, completed.stderr[-2000:]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in completed.stderr
    assert errors[0].startswith("error: config method.name = 'bogus' is not a training method; choose one of")
    for name in registry.names():
        assert f"'{name}'" in errors[0]
    assert not workdir.exists()
