"""Data parallelism: the device mesh, how batches and states are placed on it, and device prefetch.

One mesh axis, "data". Batches are split over it on their example axis (N of a training batch
`[R, N, ...]`, axis 0 of evaluation images), parameters and optimiser state are replicated. Each
process hands in its own contiguous slice of the global batch (`input_pipeline.process_slice`), so
the same code runs on one device, several local devices and several hosts.
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gerne_jax.core.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over all processes' devices, or `num_devices` of them.

    The devices are in process order, each process's own in a contiguous block: process p's devices
    hold rows [p * n, (p + 1) * n) of a batch sharded on "data", which is its `process_slice`.
    With several processes, `num_devices` takes the same number of local devices from each.
    """
    processes = jax.process_count()
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices) or num_devices % processes:
            raise ConfigError(f"config mesh.num_devices = {num_devices} must be 0 (all) or in [1, {len(devices)}]"
                              + (f" and a multiple of the {processes} processes" if processes > 1 else ""))
        per_process = num_devices // processes
        devices = [device for p in range(processes)
                   for device in [d for d in devices if d.process_index == p][:per_process]]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
    """A 1-D mesh with axis "data" over this process's devices alone (work that differs between processes)."""
    return Mesh(np.asarray(sorted(jax.local_devices(), key=lambda device: device.id)), (DATA_AXIS,))


def mesh_of(mesh_config: ml_collections.ConfigDict) -> Mesh:
    """The mesh a config's `mesh` part asks for: `mesh.num_devices` devices, all of them for 0."""
    return make_mesh(mesh_config.num_devices or None)


def batch_sharding(mesh: Mesh, batch_axis: int = 1) -> NamedSharding:
    """Sharding that splits axis `batch_axis` (N of a training batch) over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                batch_axis: int = 1) -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global jax.Arrays sharded on `batch_axis` (multi-host ready).

    Each process passes its own slice of the global batch (the whole batch on one host). Use
    `batch_axis=1` for training batches [R, N, ...] and `batch_axis=0` for eval images [N, ...].
    """
    sharding = batch_sharding(mesh, batch_axis)
    local_devices = len(mesh.local_devices)
    for name, value in batch.items():
        size = np.shape(value)[batch_axis] if np.ndim(value) > batch_axis else None
        if size is None or size % local_devices:
            raise ValueError(f"batch[{name!r}] with shape {np.shape(value)}: axis {batch_axis} must "
                             f"divide evenly over the {local_devices} local devices")
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` (e.g. a TrainState) on all devices of `mesh`, unsharded."""
    return jax.device_put(tree, replicated_sharding(mesh))


def ordered_sum(tree: Any, axis_name: str = DATA_AXIS) -> Any:
    """Inside `shard_map`: every leaf summed over the devices of `axis_name` in device order.

    An all-gather, then a sum over the gathered axis: the same program on every device, so the
    result is bit-identical however the devices are split over processes (an all-reduce may group
    the values differently across processes than within one). Each device holds one copy of every
    leaf per device of the axis meanwhile, so for gradients this suits small meshes, not a pod.
    """
    return jax.tree.map(lambda leaf: jax.lax.all_gather(leaf, axis_name, to="invarying").sum(0), tree)


def prefetch_to_mesh(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2,
                     batch_axis: int = 1) -> Iterator[dict[str, jax.Array]]:
    """Yields `batches` already placed on the mesh, keeping `size` of them in flight.

    The transfer of the next batches overlaps the device's work on the current one (`device_put` is
    asynchronous), so the step does not wait for host-to-device copies.
    """
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
        queue.append(shard_batch(batch, mesh, batch_axis))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(shard_batch(batch, mesh, batch_axis))
