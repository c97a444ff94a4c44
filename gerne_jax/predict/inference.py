"""Batched, mesh-sharded inference of a trained run on a stream of patches (whole-slide prediction).

`load_run` restores a run's checkpoint (its network only, as `evaluate.py` does: `run.Run.restore_model`)
with the data spec the run stored when it was trained (`run_log.DataSpec`: patch shape, channels, dtype,
the DATA_DIR's channel mean and std, tiling settings), so a workdir predicts without its training data.
`PatchClassifier` runs evaluation's own forward pass (`forward.probabilities`: training's standardisation
on the device, the model in inference mode, the softmax), so a patch gets the probability `evaluate.py`
gives it.

Host reading and device compute overlap: `ordered_map` runs a pool of reader threads (mask
arithmetic and copies in parallel with the tile decoding on `tiff_windows`' pool) that keeps a bounded
number of blocks in flight, and `predict_batches` dispatches batch k + 1 to the jitted model before
it fetches the result of batch k, so the device never waits on one Python thread and the host never
holds more than a few blocks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset, normalisation
from gerne_jax.evaluation import forward
from gerne_jax.runs import run as run_lib

# Batches on the device at once in `predict_batches`, and the batch arrays `rebatch` cycles through for it.
PIPELINE_DEPTH = 2

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclasses.dataclass(frozen=True)
class RestoredRun(run_lib.Run):
    """A run with one checkpoint's network restored, ready for prediction."""

    checkpoint: str
    checkpoint_meta: dict[str, Any]   # step, config, the validation metrics it was chosen on
    model: run_lib.RestoredModel


def load_run(workdir: str | os.PathLike, checkpoint: str = "best_wga",
             data_dir: str | os.PathLike | None = None) -> RestoredRun:
    """Restores `checkpoint` of the run in `workdir` (`run.Run.open`: `data_dir` is read only for a run
    trained before runs stored their data spec, and overrides its `data.dir`); the patch shape,
    normalisation and tiling settings come from the run's data spec, not from its DATA_DIR."""
    opened = run_lib.Run.open(workdir, data_dir)
    model, meta = opened.restore_model(checkpoint)
    return RestoredRun(**{field.name: getattr(opened, field.name) for field in dataclasses.fields(opened)},
                       checkpoint=checkpoint, checkpoint_meta=meta, model=model)


class PatchClassifier:
    """Class probabilities of raw patches `[n, P, P, C]` (source dtype), in fixed-size sharded batches.

    Args:
      model: a restored network (replicated on `mesh`).
      mesh: the devices; each batch is split over them.
      standardise: the training data's normalisation (`Standardiser.of` the run's data spec's metadata).
      batch_size: patches per call, rounded up to a multiple of the mesh size; smaller inputs are
        zero-padded, so one compiled program serves every call.
    """

    def __init__(self, model: run_lib.RestoredModel, mesh: Mesh, standardise: normalisation.Standardiser,
                 batch_size: int):
        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        devices = mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices
        self.model = model
        self._predictor = forward.BatchPredictor(model.module, standardise, mesh, self.batch_size)

    @classmethod
    def from_run(cls, run: RestoredRun, batch_size: int) -> PatchClassifier:
        return cls(run.model, run.mesh, normalisation.Standardiser.of(run.metadata, run.mesh), batch_size)

    def dispatch(self, images: np.ndarray) -> jax.Array:
        """Starts the model on up to `batch_size` patches; returns the (asynchronous) `[batch_size, K]`
        probabilities, of which the first `len(images)` rows are the patches'."""
        return self._predictor(self.model.variables, images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities `[n, K]` float32 of any number of patches (blocking)."""
        outputs = [np.asarray(self.dispatch(images[i:i + self.batch_size]))[:len(images[i:i + self.batch_size])]
                   for i in range(0, len(images), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(dataset.CLASS_NAMES)), np.float32)


def predict_batches(classifier: PatchClassifier, batches: Iterable[tuple[np.ndarray, Any]],
                    depth: int = PIPELINE_DEPTH) -> Iterator[tuple[np.ndarray, Any]]:
    """Yields `(probabilities [n, K], info)` for each `(images [n, P, P, C], info)` of `batches`, in order.

    Up to `depth` batches are on the device at once: the next batch is dispatched before the previous
    result is fetched, so host reading (in `batches`) and device compute overlap. A batch's images are
    no longer read once its result is fetched, which is before batch k + `depth` is asked for: `batches`
    may refill the array of batch k for it (`rebatch(..., buffers=depth)`).
    """
    pending: collections.deque = collections.deque()
    for images, info in batches:
        pending.append((len(images), info, classifier.dispatch(images)))
        if len(pending) >= depth:
            count, done_info, output = pending.popleft()
            yield np.asarray(output)[:count], done_info
    while pending:
        count, done_info, output = pending.popleft()
        yield np.asarray(output)[:count], done_info


def ordered_map(function: Callable[[Item], Result], items: Sequence[Item], workers: int,
                in_flight: int | None = None) -> Iterator[Result]:
    """`map(function, items)` computed by `workers` threads, yielded in order, with at most `in_flight`
    (default 2 * workers) results computed ahead of the consumer: a bounded queue of results."""
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    in_flight = max(1, in_flight or 2 * workers)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures: collections.deque = collections.deque()
        try:
            for item in items:
                futures.append(pool.submit(function, item))
                if len(futures) >= in_flight:
                    yield futures.popleft().result()
            while futures:
                yield futures.popleft().result()
        finally:
            for future in futures:  # the consumer stopped early (an error): drop what is queued
                future.cancel()


def rebatch(chunks: Iterable[tuple[Sequence[np.ndarray], dict[str, np.ndarray]]], batch_size: int,
            buffers: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Regroups `(patches, fields {name: [m]})` chunks of any size into batches `[batch_size, ...]`
    (the last one smaller), fields kept beside their patches.

    `patches` is an array `[m, ...]` or a sequence of m arrays of one shape, such as views into the rows
    a reader thread read: each patch is copied once, straight into a batch array (a strided gather
    into a chunk array and then a concatenation would copy every byte three times). With `buffers`,
    the batches are written into that many arrays in turn, so batch k's array holds batch k + `buffers`
    once that is asked for (the consumer must be done with it by then, as `predict_batches` is): a fresh
    array per batch costs the kernel a page fault and a zeroed page per 4 KiB, more than the copy.
    """
    if buffers is not None and buffers < 1:
        raise ValueError(f"buffers must be >= 1, got {buffers}")
    arrays: list[np.ndarray] = []
    made = 0  # batches begun
    batch: np.ndarray | None = None
    field_parts: list[dict[str, np.ndarray]] = []
    held = 0
    for patches, fields in chunks:
        start = 0
        while start < len(patches):
            if batch is None:
                if buffers is not None and len(arrays) == buffers:
                    batch = arrays[made % buffers]
                else:
                    first = np.asarray(patches[start])
                    batch = np.empty((batch_size, *first.shape), first.dtype)
                    if buffers is not None:
                        arrays.append(batch)
                made += 1
            take = min(batch_size - held, len(patches) - start)
            for i in range(take):
                batch[held + i] = patches[start + i]
            field_parts.append({name: values[start:start + take] for name, values in fields.items()})
            held += take
            start += take
            if held == batch_size:
                yield batch, _joined(field_parts)
                batch, field_parts, held = None, [], 0
    if held:
        yield batch[:held], _joined(field_parts)


def _joined(field_parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in field_parts]) for name in field_parts[0]}
