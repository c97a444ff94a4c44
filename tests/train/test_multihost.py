"""Two processes of two CPU devices each train through train.py as one process of four devices does.

Each run is a real `train.py` command in its own subprocess (JAX's distributed runtime over localhost,
gloo collectives, `--xla_force_host_platform_device_count=2` per process) on the same global batches as
the one-process reference (`input_pipeline.process_slice` gives each process its half). Process 1 of
the pair is killed (SIGKILL) during step 4, after the step-2 checkpoint; the survivor is stopped and
both are started again: they resume from step 2 and end with the reference's parameters.

The runs use frozen BatchNorm (no batch statistics to reduce; GroupNorm would normalise the tiny
model's 1 x 1 last stage to zero, and every gradient with it) and `mesh.deterministic_reduction`, which
sums every cross-device reduction of the step in device order: the parameters are then exactly those
of the one-process run (with the default all-reduce, gloo's cross-process sum groups the devices'
values differently from the in-process one, and the runs end about 1.2e-7 apart).

Every subprocess runs in its own process group, all of them are killed when the time limit passes or
the fixture fails, so a hung collective fails the test with the processes' output instead of hanging
the suite.
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from gerne_jax.commands import evaluate
from gerne_jax.core import distributed, sharding
from gerne_jax.core.errors import ConfigError
from gerne_jax.models import factory
from gerne_jax.runs import checkpoints, run_log
from gerne_jax.train import extrapolation, train_state
from tests.helpers import REPO as ROOT
from tests.helpers import TINY_CHANNELS, TINY_PATCH

LIMIT_S = 480  # for all launches: about 160 CPU-seconds, 80 s on 2 idle cores
SURVIVOR_S = 10  # how long the survivor of the kill may take to stop by itself
KILL_AT_STEP = 3  # process 1 dies when step 4 starts: step 2 is checkpointed, step 3 is done
LAUNCHER_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                      "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                      "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")

# train.py as `python train.py ...`, but the step function SIGKILLs this process before it runs step
# `argv[1] + 1` (the state of step argv[1] is its input): a crash mid-run that no code of ours sees.
_KILLED_TRAIN_PY = textwrap.dedent("""
    import os, runpy, signal, sys
    from gerne_jax.train import train_step
    kill_at, real = int(sys.argv.pop(1)), train_step.make_train_step
    def make_train_step(*args, **kwargs):
        step_fn = real(*args, **kwargs)
        def step(state, batch):
            if int(state.step) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(state, batch)
        return step
    train_step.make_train_step = make_train_step
    sys.argv[0] = "train.py"
    runpy.run_path("train.py", run_name="__main__")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    # No persistent compilation cache: the processes of a pair must reach each collective within
    # gloo's 30 s, which a process compiling while its peer reads the cache can miss on a busy machine.
    # Nor a launcher's variables (a suite run inside an srun step): the runs are launched as written here.
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(ROOT)}


class Launch:
    """One train.py process in its own process group, its output in `log`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: pathlib.Path,
                 kill_at: int | None = None):
        self.name, self.log = name, log
        command = [sys.executable, "train.py", *args] if kill_at is None else [
            sys.executable, "-c", _KILLED_TRAIN_PY, str(kill_at), *args]
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace").replace("\r", "\n")

    def kill(self) -> None:
        """SIGKILL to its process group, if it still runs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait(launches: list[Launch], limit_s: float) -> list[int]:
    """The exit statuses; on time-out the test fails with the processes' output (the fixture kills them)."""
    deadline = time.monotonic() + limit_s
    try:
        for launch in launches:
            launch.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"train.py processes still running after {limit_s:.0f} s:\n"
                    + "\n".join(f"--- {launch.name}:\n{launch.output()[-2000:]}" for launch in launches))
    return [launch.process.returncode for launch in launches]


def _train(workdir: pathlib.Path, common: list[str], processes: int, name: str,
           kill: dict[int, int] | None = None) -> list[Launch]:
    """Starts one run of `processes` processes (the 4 devices split evenly among them); logs `NAME.<i>.log`."""
    args = [*common, f"--workdir={workdir}"]
    if processes == 1:
        return [Launch(name, args, _env(4), workdir.parent / f"{name}.log")]
    port = _free_port()
    return [Launch(f"{name} process {i}", [*args, f"--config.mesh.coordinator_address=localhost:{port}",
                                           f"--config.mesh.num_processes={processes}",
                                           f"--config.mesh.process_id={i}"],
                   _env(4 // processes), workdir.parent / f"{name}.{i}.log", (kill or {}).get(i))
            for i in range(processes)]


def _checked(launches: list[Launch], statuses: list[int]) -> None:
    for launch, status in zip(launches, statuses):
        assert status == 0, f"{launch.name} exited with {status}:\n{launch.output()[-3000:]}"


def _params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """The parameters and BatchNorm statistics (if any) of checkpoint `latest/<step>`, restored on one device."""
    config = run_log.read_config(workdir)
    model = factory.create_model(config.model)
    optimizer = extrapolation.optimizer_from_config(config.optimizer, config.training.steps,
                                                    extrapolation.beta_schedule(config.method))
    target = train_state.abstract_state(model, optimizer, (TINY_PATCH, TINY_PATCH, len(TINY_CHANNELS)),
                                        sharding.make_mesh(1), config.training.seed)
    run = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        state, meta = run.restore(step, target)
    finally:
        run.close()
    assert meta["step"] == step
    return [np.asarray(leaf) for leaf in jax.tree.leaves((state.params, state.batch_stats))]


def _max_abs_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


def _assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    """Every leaf bit-equal (dtype, shape and values)."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"leaf {i} differs"


def _assert_same_metrics(rows: list[dict], expected: list[dict]) -> None:
    """The same rows (step, split, metric names) with values equal up to float32 summation order."""
    assert [(row["step"], row["split"], sorted(row)) for row in rows] == [
        (row["step"], row["split"], sorted(row)) for row in expected]
    for row, reference in zip(rows, expected):
        for key, value in row.items():
            if key not in ("step", "split", "images_per_second"):  # images/s depends on the machine's speed
                assert value == pytest.approx(reference[key], rel=1e-5, abs=1e-6, nan_ok=True), (row["step"], key)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("variables, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, None),  # one task: one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # a batch script outside an srun step
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1234", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "TPU pod slice"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
])
def test_detected_launcher_needs_a_launch_of_several_processes(no_launcher, variables, expected):
    for name, value in variables.items():
        no_launcher.setenv(name, value)
    assert distributed.detected_launcher() == expected


def test_one_process_starts_no_distributed_runtime(no_launcher):
    assert distributed.initialize() is False
    assert distributed.initialize("off") is False
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("settings, names, message", [
    ({"mode": "yes"}, distributed.CONFIG_NAMES, "mesh.distributed = 'yes'; choose one of"),
    ({"mode": "off", "coordinator_address": "h:1"}, distributed.CONFIG_NAMES, "mesh.coordinator_address set"),
    ({"num_processes": 2, "process_id": 1}, distributed.CONFIG_NAMES,
     "mesh.num_processes, mesh.process_id set without mesh.coordinator_address"),
    ({"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 2}, distributed.CONFIG_NAMES,
     "mesh.process_id = 2 must be in [0, mesh.num_processes = 2)"),
    ({"process_id": 3}, evaluate.LAUNCH_FLAGS, "--process-id set without --coordinator-address"),
])
def test_bad_launch_settings_name_the_key_before_starting_anything(no_launcher, settings, names, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        distributed.initialize(**settings, names=names)
    assert not jax.distributed.is_initialized()


def test_num_devices_outside_the_devices_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape(f"mesh.num_devices = {jax.device_count() + 1} must be")):
        sharding.make_mesh(jax.device_count() + 1)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The reference (one process, 4 devices) and a pair (2 x 2 devices) whose process 1 is killed during
    step 4 and which is then started again: their launches, and what the killed run left."""
    root = tmp_path_factory.mktemp("multihost")
    # GERNE's paired step: both batches' gradients, losses and accuracies are reduced across the
    # processes, in device order.
    common = ["--config=configs/tiny.py:gerne", f"--config.data.dir={tiny_data.path}", "--config.data.taus=(0.1,)",
              "--config.model.norm=frozen", "--config.mesh.deterministic_reduction=true"]
    started: list[Launch] = []
    try:
        reference = _train(root / "reference", common, 1, "reference")
        killed = _train(root / "killed", common, 2, "killed", kill={1: KILL_AT_STEP})
        started += reference + killed
        deadline = time.monotonic() + LIMIT_S
        (killed_status,) = _wait(killed[1:], LIMIT_S)
        assert killed_status == -signal.SIGKILL, killed[1].output()[-3000:]
        # The survivor stops at its next collective (gloo: connection reset by peer) but then waits for
        # its dead peer at the distributed runtime's shutdown barrier until the heartbeat times out; a
        # scheduler (srun, a TPU pod's job) ends it, as here, once one process of the job has died.
        try:
            killed[0].process.wait(timeout=SURVIVOR_S)
        except subprocess.TimeoutExpired:
            killed[0].kill()
        assert killed[0].process.returncode != 0, killed[0].output()[-3000:]
        killed_rows = run_log.read_metrics(root / "killed")
        killed_checkpoints = sorted(int(p.name) for p in (root / "killed" / "checkpoints" / "latest").iterdir()
                                    if p.name.isdigit())
        resumed = _train(root / "killed", common, 2, "resumed")
        started += resumed
        launches = reference + resumed
        _checked(launches, _wait(launches, deadline - time.monotonic()))
    finally:
        for launch in started:
            launch.kill()
    return {"root": root, "reference": reference, "killed": killed, "killed_rows": killed_rows,
            "killed_checkpoints": killed_checkpoints, "resumed": resumed}


@pytest.mark.slow  # five train.py processes together
def test_two_processes_compute_what_one_process_with_four_devices_does(runs):
    """The killed run's steps 1-3, before the kill: parameters of its step-2 checkpoint, training
    metrics and the validation figures of its two-process evaluation (each process predicts its share)."""
    root = runs["root"]
    reference, pair = _params(root / "reference", 2), _params(root / "killed", 2)
    print(f"\ntwo processes vs one process, step 2: max abs difference of parameters "
          f"{_max_abs_difference(reference, pair):.3g}")
    # The same programs and global batches, every reduction summed in device order: exactly equal.
    _assert_identical(pair, reference)
    reference_rows = [row for row in run_log.read_metrics(root / "reference") if row["step"] <= KILL_AT_STEP]
    # The steps train (equal parameters of a model that does not move would prove nothing).
    assert all(row["grad_norm_biased"] > 0 and row["grad_norm_less_biased"] > 0
               for row in reference_rows if row["split"] == "train")
    _assert_same_metrics(runs["killed_rows"], reference_rows)


@pytest.mark.slow  # five train.py processes together
def test_killed_process_and_restarted_pair_resume_to_the_parameters_of_one_process(runs, tiny_config):
    root = runs["root"]
    steps = tiny_config().training.steps
    # The kill came after the step-2 checkpoint and step 3's log row, before step 4.
    assert max(row["step"] for row in runs["killed_rows"]) == KILL_AT_STEP
    assert runs["killed_checkpoints"] == [2]
    assert "Resuming from step 2 " in runs["resumed"][0].output()
    reference, pair = _params(root / "reference", steps), _params(root / "killed", steps)
    print(f"\nkilled and resumed pair vs one process, step {steps}: max abs difference "
          f"{_max_abs_difference(reference, pair):.3g}")
    _assert_identical(pair, reference)
    # Every step logged once: the rows of step 3, redone after the resume, replaced the killed run's.
    _assert_same_metrics(run_log.read_metrics(root / "killed"), run_log.read_metrics(root / "reference"))


@pytest.mark.slow  # five train.py processes together
def test_only_process_zero_logs_and_holds_the_lock(runs):
    root = runs["root"]
    main, other = (launch.output() for launch in runs["resumed"])
    assert "validation WGA" in main and "training:" in main and "Resuming from step" in main
    assert not any(text in other for text in ("validation WGA", "training:", "Batch plan", "Resuming"))
    assert f"pid {runs['resumed'][0].process.pid} " in (root / "killed" / ".lock").read_text()
