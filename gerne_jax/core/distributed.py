"""Several processes, one run: JAX's distributed runtime, and what the processes of a run must agree on.

A run on a TPU pod slice or on several GPU hosts is one process per host (or per GPU), all running the
same command. `initialize` starts JAX's distributed runtime in each of them before anything touches a
device, so that `jax.devices()` lists every process's devices and the mesh (`sharding.make_mesh`) spans
them all. It is asked for explicitly (a coordinator address, the process count and this process's id)
or found in the environment of the usual launchers (SLURM's `srun`, Open MPI's `mpirun`, a TPU pod
slice); on CPU, cross-process collectives run over TCP with gloo.

The processes must take the same decisions at the same steps, or one of them waits forever in a
collective: `main_process_lock` takes the workdir lock in process 0 and tells every process whether
it got it, and `any_process` turns a flag of one process (SIGTERM arrived) into a decision of all.
Files other than checkpoints (config, metrics, logs, reports) are written by process 0 alone
(`is_main_process`); checkpoints by every process through orbax.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from gerne_jax.core import files
from gerne_jax.core.errors import ConfigError, InputError

MODES = ("auto", "on", "off")
# How each setting is named in error messages: train.py's config keys (evaluate.py passes its flags).
CONFIG_NAMES = {"mode": "mesh.distributed", "coordinator_address": "mesh.coordinator_address",
                "num_processes": "mesh.num_processes", "process_id": "mesh.process_id"}


def detected_launcher() -> str | None:
    """The multi-process launcher whose environment this process runs in, or None.

    Only launches of more than one process count, and only the environments JAX reads its settings
    from (`jax.distributed.initialize()` with no arguments): an `srun` step of several tasks, an
    Open MPI job of several ranks, a TPU pod slice whose workers are listed in the environment (GKE,
    multislice). A Cloud TPU VM that lists its workers only in its metadata server needs
    `mode="on"`.
    """
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm) and _count(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([worker for worker in workers.split(",") if worker.strip()]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "TPU pod slice"
    return None


def _count(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               names: Mapping[str, str] = CONFIG_NAMES) -> bool:
    """Starts JAX's distributed runtime when asked to or when a launcher's environment is detected.

    Call it once per process, before any other JAX call that touches a device.

    Args:
      mode: "auto" starts it when `coordinator_address` is set or `detected_launcher()` finds one;
        "on" always (JAX takes what is not set here from the environment: TPU metadata, SLURM, ...);
        "off" never (one process).
      coordinator_address: "host:port" of process 0, which all processes reach; "" from the environment.
      num_processes: the number of processes; 0 from the environment.
      process_id: this process's index in [0, num_processes); -1 from the environment.
      names: how the settings are named in error messages (config keys or command-line flags).

    Returns whether the runtime was started (False: one process). Bad settings raise a `ConfigError`
    naming them.
    """
    if mode not in MODES:
        raise ConfigError(f"{names['mode']} = {mode!r}; choose one of {MODES}")
    launcher = detected_launcher()
    explicit = {key: value for key, value in (("coordinator_address", coordinator_address),
                                              ("num_processes", num_processes), ("process_id", process_id))
                if value not in ("", 0, -1, None)}
    if mode == "off":
        if explicit:
            raise ConfigError(f"{names['mode']} = 'off' but {', '.join(names[key] for key in explicit)} "
                              "set: remove them, or use 'auto'")
        return False
    if mode == "auto" and not coordinator_address and launcher is None:
        if explicit:
            raise ConfigError(f"{', '.join(names[key] for key in explicit)} set without "
                              f"{names['coordinator_address']} (host:port of process 0)")
        return False
    if num_processes < 0 or (num_processes and not -1 <= process_id < num_processes):
        raise ConfigError(f"{names['process_id']} = {process_id} must be in [0, {names['num_processes']} = "
                          f"{num_processes})")
    if jax.distributed.is_initialized():
        return True
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # CPU devices of different processes reach each other over TCP (gloo); no effect on GPU or TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address or None,
                                   num_processes=num_processes or None,
                                   process_id=None if process_id < 0 else process_id)
    except (ValueError, TypeError) as error:  # JAX found no value for a setting
        raise ConfigError(f"cannot start the distributed runtime ({error}); set {names['coordinator_address']}, "
                          f"{names['num_processes']} and {names['process_id']}, or launch with srun, mpirun "
                          "or on a TPU pod slice") from None
    return True


def is_main_process() -> bool:
    """True in process 0, the one that writes the run's files other than checkpoints."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


@contextlib.contextmanager
def main_process_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """`files.exclusive_lock(folder, what)` for a run of one or several processes.

    Process 0 holds the lock, so the processes of one run sharing `folder` do not lock each other
    out; all of them learn whether it got it, and all raise the same `InputError` when it did not
    (each one waiting in a collective for a process that gave up would hang).
    """
    if jax.process_count() == 1:
        with files.exclusive_lock(folder, what):
            yield
        return
    with contextlib.ExitStack() as stack:
        failure: InputError | None = None
        if is_main_process():
            try:
                stack.enter_context(files.exclusive_lock(folder, what))
            except InputError as error:
                failure = error
        if any_process(failure is not None):
            if failure is not None:
                raise failure
            raise InputError(f"{folder} is in use by another run ({what}), which process 0 names; wait for "
                             "it to finish or stop it, then run this command again")
        yield


# How long the processes of a run wait at `meet` for the slowest one (a whole share of slides to predict);
# a process that dies is noticed sooner, by the distributed runtime's heartbeats.
MEET_TIMEOUT_MS = 7 * 24 * 3600 * 1000
_meetings = itertools.count()  # every process calls `meet` in the same order: the same barrier names


def meet(stage: str, error: Exception | None) -> None:
    """Waits for every process of the run at a barrier of JAX's distributed runtime (its coordination
    service, not a collective on the devices: the processes may arrive hours apart); then raises `error`, or
    an InputError naming another process's, if any process brought one."""
    from jax._src import distributed as runtime  # the runtime's client: no public API has barriers

    client = runtime.global_state.client
    name = f"gerne_jax/{next(_meetings)}-{stage}"
    if error is not None:
        client.key_value_set(f"{name}/{jax.process_index()}", f"{type(error).__name__}: {error}")
    client.wait_at_barrier(name, MEET_TIMEOUT_MS)
    if error is not None:
        raise error
    reported = sorted(client.key_value_dir_get(f"{name}/"), key=lambda item: int(item[0].rsplit("/", 1)[1]))
    if reported:
        key, message = reported[0]
        raise InputError(f"process {key.rsplit('/', 1)[1]} of the run stopped ({message}); so do the others")
