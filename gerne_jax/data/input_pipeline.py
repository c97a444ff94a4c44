"""tf.data input pipeline: training batches of a sampling plan, and padded evaluation batches.

The only `gerne_jax` module that imports TensorFlow. Examples are read by index, either from in-memory
numpy arrays or from a DATA_DIR's array_record shards (`load_split(..., in_memory=False)`), so every
step's batch is a pure function of (seed, step) and training resumes exactly at any `start_step`.

Images come out in their source dtype (uint8 for most slides): `gerne_jax.data.normalisation` standardises
them on the device, which spares the host the float work and the accelerator's link three quarters of
the bytes.

Training (`train_dataset`) yields `{image [R, n, P, P, C] source dtype, label [R, n] int32}` per step, with
`R` the rows asked for of a sampler's draws (`gerne_jax.data.samplers`): both batches of GERNE's pair
(row 0 biased, row 1 less-biased) or the biased batch alone (ERM). `n = N / process_count` is this
process's contiguous share of the global batch `N = K * A * B`. The indices are always drawn for the
whole sampler, so the biased batch of step t is the same whichever rows are loaded: ERM and GERNE runs
with one seed see the same biased batches.

Natural-distribution batches (`natural_batches`, for precise BatchNorm statistics, `gerne_jax.train.batch_stats`):
each batch draws its examples uniformly without replacement from the whole split, whatever the method's
sampling plan, as a pure function of (seed, step, batch number); no augmentation, as in evaluation.

Evaluation (`eval_dataset`) yields every example of a split exactly once, in index order, as `{image}`
batches of a fixed size whose last one is zero-padded; the caller keeps the first M predictions.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from gerne_jax.data import dataset, samplers
from gerne_jax.data.groups import BIASED, LESS_BIASED


class ImageSource(Protocol):
    """What the pipelines need of a split's images: a numpy array `[M, P, P, C]` or `PatchImages`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, indices: np.ndarray) -> np.ndarray: ...


class PatchImages:
    """The images of one split of a DATA_DIR, read from the array_record shards by index.

    Behaves like a read-only `[M, P, P, C]` numpy array for `len`, `shape`, `dtype` and `images[indices]`
    with a 1-D integer index array; repeated indices are read once.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        feature = builder.info.features["image"]
        self.source = builder.as_data_source(split)  # decodes whole examples by index
        self.shape = (len(self.source), *feature.shape)
        self.dtype = np.dtype(feature.np_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        unique, inverse = np.unique(indices, return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"indices {unique[0]}..{unique[-1]} outside a split of {len(self)} examples")
        images = np.empty((unique.size, *self.shape[1:]), self.dtype)
        for row, example in enumerate(self.source.__getitems__(unique.tolist())):
            images[row] = example["image"]
        return images[inverse.reshape(indices.shape)]


def load_split(data_dir: str | pathlib.Path, split: str, in_memory: bool = True,
               chunk: int = 1024) -> dict[str, Any]:
    """One split of a DATA_DIR: `image` plus the patch fields of `dataset.PATCH_FIELDS` (label, tissue
    ratio, ...) as numpy arrays in index order (the fields come from `patches.csv`).

    With `in_memory=True`, `image` is a numpy array `[M, P, P, C]` in the source dtype (and the labels
    decoded from the shards are checked against `patches.csv`); otherwise it is a `PatchImages` that
    reads the shards by index, for splits that do not fit in RAM.
    """
    data_dir = pathlib.Path(data_dir)
    dataset.read_metadata(data_dir)  # a clear error for a folder that is not a dataset
    builder = tfds.builder_from_directory(str(data_dir))
    if split not in builder.info.splits:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
    fields = dataset.read_patch_table(data_dir, split)
    images = PatchImages(builder, split)
    if len(images) != fields["label"].size:
        raise ValueError(f"{data_dir}: split {split!r} has {len(images)} examples in its shards but "
                         f"{fields['label'].size} rows in {dataset.PATCHES_CSV}")
    if in_memory:
        array = np.empty(images.shape, images.dtype)
        for start in tqdm.trange(0, len(images), chunk, desc=f"loading {split}", unit_scale=chunk,
                                 disable=len(images) <= chunk or jax.process_index() != 0):
            examples = images.source.__getitems__(list(range(start, min(start + chunk, len(images)))))
            for offset, example in enumerate(examples):
                if example["label"] != fields["label"][start + offset]:
                    raise ValueError(f"{data_dir}: example {start + offset} of split {split!r} has label "
                                     f"{example['label']} in the shards but "
                                     f"{fields['label'][start + offset]} in {dataset.PATCHES_CSV}")
                array[start + offset] = example["image"]
        images = array
    return {"image": images, **fields}


def process_slice(batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """This process's contiguous share of a global batch (defaults: `jax.process_index/count()`)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"the global batch of {batch_size} examples does not divide among "
                         f"{process_count} processes")
    share = batch_size // process_count
    return slice(process_index * share, (process_index + 1) * share)


def _dihedral(images: np.ndarray, rotations: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Per image: optional flips (rows, columns), then `rot90` k times. images `[n, P, P, C]`.

    The images sharing one transform are moved together (at most 16 array operations, not one per image).
    """
    out = np.empty_like(images)
    codes = np.asarray(rotations) * 4 + np.asarray(flips, np.int64) @ np.array([2, 1])
    for code in np.unique(codes):
        chosen = np.flatnonzero(codes == code)
        turns, flip_rows, flip_columns = code // 4, code // 2 % 2, code % 2
        moved = images[chosen]
        moved = moved[:, ::-1] if flip_rows else moved
        moved = moved[:, :, ::-1] if flip_columns else moved
        out[chosen] = np.rot90(moved, turns, axes=(1, 2))
    return out


def _image_shape(images: ImageSource) -> tuple[int, int, int]:
    if len(images.shape) != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [examples, P, P, channels], got shape {tuple(images.shape)}")
    return tuple(images.shape[1:])


def train_dataset(images: ImageSource, label: np.ndarray, sampler: samplers.StepSampler, *,
                  start_step: int = 0, rows: Sequence[int] = (BIASED, LESS_BIASED), flips: bool = False,
                  rotations: bool = False, group: np.ndarray | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
    """The endless stream of training batches; its i-th element is step `start_step + i`.

    Args:
      images: `[M, P, P, C]` numpy array or `PatchImages`, any dtype (yielded as it is).
      label: `[M]` integers.
      sampler: each step's global indices `[R', N]` (`gerne_jax.data.samplers`), e.g. the pair of a
        `PairedIndexSampler` or the single batch of an `UpsampledIndexSampler`.
      start_step: step t's indices and augmentations depend only on (sampler seed, t).
      rows: which of the sampler's rows to load, in this order: `(BIASED, LESS_BIASED)` for GERNE,
        `(BIASED,)` for ERM. Only these images are read; the draws are the sampler's whatever the rows.
      flips, rotations: random flips and 90-degree rotations per image (off by default, as in the papers).
      group: `[M]` each example's group id `y * A + a`, yielded as `group` `[R, n]` int32 (GroupDRO);
        None yields none.
      process_index, process_count: this process's share (defaults from jax); the global draws are the
        same on every process.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    label = np.asarray(label)
    if images.shape[0] != label.size:
        raise ValueError(f"{images.shape[0]} images but {label.size} labels")
    if group is not None and np.shape(group) != label.shape:
        raise ValueError(f"group {np.shape(group)} must have one id per example, like label {label.shape}")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or not 1 <= rows.size <= 2 or not np.isin(rows, (BIASED, LESS_BIASED)).all():
        raise ValueError(f"rows must name one or both of the pair (0 biased, 1 less-biased), got {rows.tolist()}")
    label = label.astype(np.int32)
    group_ids = np.zeros(label.shape, np.int32) if group is None else np.asarray(group, np.int32)
    share = process_slice(sampler.batch_size, process_index, process_count)
    local = share.stop - share.start
    image_shape = _image_shape(images)

    def load(step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = sampler.rng(int(step))
        indices = sampler.draw(rng)
        turns = rng.integers(0, 4, size=indices.shape) if rotations else np.zeros(indices.shape, np.int64)
        mirror = rng.integers(0, 2, size=(*indices.shape, 2)) if flips else np.zeros((*indices.shape, 2), bool)
        indices, turns, mirror = indices[rows, share], turns[rows, share], mirror[rows, share]
        batch = images[indices.ravel()]
        if flips or rotations:
            batch = _dihedral(batch, turns.ravel(), mirror.reshape(-1, 2))
        return batch.reshape(rows.size, local, *image_shape), label[indices], group_ids[indices]

    def to_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
        image, batch_label, batch_group = tf.numpy_function(
            load, [step], [tf.as_dtype(images.dtype), tf.int32, tf.int32], stateful=False)
        batch = {"image": tf.ensure_shape(image, (rows.size, local, *image_shape)),
                 "label": tf.ensure_shape(batch_label, (rows.size, local))}
        if group is not None:
            batch["group"] = tf.ensure_shape(batch_group, (rows.size, local))
        return batch

    batches = tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)
    batches = batches.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


# Keeps the precise-BN draws of step t apart from the training draws of step t (`default_rng([seed, t])`).
_NATURAL_STREAM = 1


def natural_batches(images: ImageSource, *, num_batches: int, batch_size: int, seed: int, step: int,
                    process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """`num_batches` global batches drawn uniformly from the split (the natural distribution).

    Each element is `{"image": [n, P, P, C]}` (source dtype), this process's contiguous share of a global
    batch of `batch_size` distinct examples (all of them, with repeats only across batches, if the split is
    smaller). The draws depend only on (seed, step, batch number), so a resumed run draws the same.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches ({num_batches}) and batch_size ({batch_size}) must be positive")
    if int(seed) != seed or seed < 0 or step < 0:
        raise ValueError(f"seed ({seed!r}) and step ({step}) must be non-negative integers")
    num_examples = images.shape[0]
    share, image_shape = process_slice(batch_size, process_index, process_count), _image_shape(images)
    local = share.stop - share.start

    def load(batch: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([int(seed), int(step), _NATURAL_STREAM, int(batch)])
        indices = samplers.draw_window(rng, np.arange(num_examples), batch_size)
        return images[indices[share]]

    def to_batch(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        image = tf.numpy_function(load, [batch], tf.as_dtype(images.dtype), stateful=False)
        return {"image": tf.ensure_shape(image, (local, *image_shape))}

    batches = tf.data.Dataset.range(num_batches)
    batches = batches.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def eval_dataset(images: ImageSource, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
    """Every image once, in index order, as `ceil(M / batch_size)` global batches zero-padded at the end.

    Each element is `{"image": [n, P, P, C]}` (source dtype), this process's contiguous share of a global
    batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_examples = images.shape[0]
    share, image_shape = process_slice(batch_size, process_index, process_count), _image_shape(images)
    local = share.stop - share.start

    def load(batch: np.ndarray) -> np.ndarray:
        indices = np.arange(int(batch) * batch_size, (int(batch) + 1) * batch_size)[share]
        present = indices[indices < num_examples]
        image = np.zeros((local, *image_shape), images.dtype)
        image[:present.size] = images[present]
        return image

    def to_batch(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        image = tf.numpy_function(load, [batch], tf.as_dtype(images.dtype), stateful=False)
        return {"image": tf.ensure_shape(image, (local, *image_shape))}

    batches = tf.data.Dataset.range(-(-num_examples // batch_size))
    batches = batches.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)
