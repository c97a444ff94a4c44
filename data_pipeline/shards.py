"""TFDS patch shards: serialisation, per-channel moments and the finished DATA_DIR layout.

One module writes every patch dataset, whether the patches come from the tiler (one array_record file
per slide, written as the slide is scanned) or from in-memory arrays (`write_patch_dataset`), in the
DATA_DIR layout that gerne_jax/data/dataset.py declares (names, splits, dtypes, patches.csv; docs/design.md §2):
`tfds.builder_from_directory(DATA_DIR).as_data_source(split)[i]` is row `index == i` of that split in
patches.csv. Records are serialised deterministically, so the same patches give byte-identical shards.

Patch rows and metadata use the code names (`tumour_fraction`, `min_tumour_pixels`); the shard features,
patches.csv and metadata.json get the on-disk names through `dataset.on_disk` / `dataset.to_disk`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from tensorflow_datasets.core.utils import dtype_utils
from tensorflow_datasets.proto import tf_example_pb2

from data_pipeline import storage
from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.data.dataset import DatasetError

FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
SHARD_SUFFIX = "array_record"
# 'group_size:1' keeps every record individually addressable (as TFDS writes); zstd level 1 writes
# about 1.7x faster than the default level 3 at the same size on microscopy patches.
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"
# Records handed to the writer thread and not yet written (memory: WRITE_AHEAD records).
WRITE_AHEAD = 64


def patch_features(patch_size: int, num_channels: int, dtype: Any) -> tfds.features.FeaturesDict:
    """The TFDS features of one patch example (pixels stored as raw bytes in the source dtype), under
    the on-disk names."""
    dtype = np.dtype(dtype)
    if dtype.type not in {supported.type for supported in dataset.IMAGE_DTYPES}:  # either byte order
        raise ValueError(f"patch dtype {dtype} is not supported; expected one of "
                         f"{[supported.name for supported in dataset.IMAGE_DTYPES]}")
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(patch_size, patch_size, num_channels), dtype=dtype,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(dataset.CLASS_NAMES)),
        dataset.on_disk("tumour_fraction"): tfds.features.Scalar(dtype=np.float32),
        "tissue_ratio": tfds.features.Scalar(dtype=np.float32),
        "slide_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "x": tfds.features.Scalar(dtype=np.int64),
        "y": tfds.features.Scalar(dtype=np.int64),
    })


class PatchSerializer:
    """Encodes a patch example dict (`image` plus a `dataset.patch_row`, code names) into deterministic
    `tf.train.Example` bytes under the features' on-disk names.

    The features encode the example (checks, image to raw bytes); every encoded field is one scalar,
    which goes into the proto as a one-value list of the kind TFDS's `ExampleSerializer` gives its
    dtype, producing the same bytes at a fraction of that serializer's per-field cost (it builds an
    array and a proto per field). `FeaturesDict.serialize_example` serialises the proto's feature map
    in hash order, which differs between processes; deterministic serialisation sorts it, so reruns
    give byte-identical shards.
    """

    def __init__(self, features: tfds.features.FeaturesDict):
        self._features = features
        self._fields = {}  # on-disk name -> (proto list kind, numpy dtype)
        for name, info in features.get_serialized_info().items():
            if info.shape != () or info.sequence_rank:
                raise ValueError(f"feature {name!r} is not a scalar ({info}); patch examples have "
                                 "scalar fields only")
            if dtype_utils.is_integer(info.np_dtype) and np.dtype(info.np_dtype) == np.int64:
                kind = "int64_list"
            elif dtype_utils.is_floating(info.np_dtype):
                kind = "float_list"
            elif dtype_utils.is_string(info.np_dtype):
                kind = "bytes_list"
            else:
                raise ValueError(f"feature {name!r}: dtype {info.np_dtype} has no direct tf.train.Feature list")
            self._fields[name] = (kind, info.np_dtype)

    def __call__(self, example: Mapping[str, Any]) -> bytes:
        encoded = self._features.encode_example(dataset.to_disk(example))
        proto = tf_example_pb2.Example()
        feature = proto.features.feature
        for name, (kind, dtype) in self._fields.items():
            value = encoded[name]
            if kind != "bytes_list":
                value = np.asarray(value, dtype).item()  # the dtype's rounding, as TFDS applies it
            elif isinstance(value, np.ndarray):  # text: a 0-d object array; the image: bytes already
                value = value.item()
            if isinstance(value, str):
                value = value.encode("utf-8")
            getattr(feature[name], kind).value.append(value)
        return proto.SerializeToString(deterministic=True)


@dataclasses.dataclass
class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations (M2), float64, mergeable.

    Merging uses Chan et al.'s pairwise update, which stays accurate where sum / sum-of-squares
    would cancel (bright uint16 channels with a small spread).
    """

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Adds a group of `count` pixels with per-channel `mean` and `m2`."""
        if count == 0:
            return
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(m2, np.float64)
        if self.count == 0:
            self.count, self.mean, self.m2 = float(count), mean.copy(), m2.copy()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def add_pixels(self, pixels: np.ndarray) -> None:
        """Adds pixels [n, C] (any dtype; computed in float64)."""
        pixels = np.asarray(pixels, np.float64)
        if len(pixels):
            mean = pixels.mean(axis=0)
            self.merge(len(pixels), mean, ((pixels - mean) ** 2).sum(axis=0))

    def merge_moments(self, other: ChannelMoments) -> None:
        if other.count:
            self.merge(other.count, other.mean, other.m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (numpy's default, ddof=0)."""
        return np.sqrt(self.m2 / self.count)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count,
                "mean": None if self.mean is None else self.mean.tolist(),
                "m2": None if self.m2 is None else self.m2.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChannelMoments:
        to_array = lambda v: None if v is None else np.asarray(v, np.float64)  # noqa: E731
        return cls(float(data["count"]), to_array(data["mean"]), to_array(data["m2"]))


class PixelStatistics:
    """Accumulates per-channel moments over every pixel of the patches added.

    uint8 / uint16 pixels: exact per-channel sums of x and x^2 (integer numpy reductions, Python ints
    across calls), so mean and variance come from exact integers and nothing cancels. Float
    (float32) pixels: `ChannelMoments` (float64, pairwise merges).
    """

    COLUMN_CHUNK = 2048  # columns reduced at a time (chunks no window covers are skipped)

    def __init__(self, num_channels: int, dtype: Any):
        self._num_channels = num_channels
        self._exact = np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16))
        self._count, self._sum, self._sum_of_squares = 0, [0] * num_channels, [0] * num_channels
        self._float_moments = ChannelMoments()

    def add(self, patches: np.ndarray) -> None:
        """Adds every pixel of `patches` [..., C]."""
        self.add_windows(patches.reshape(-1, 1, self._num_channels), np.zeros(1, np.int64), 1)

    def add_windows(self, band: np.ndarray, starts: np.ndarray, width: int) -> None:
        """Adds the pixels of `band[:, s:s + width]` (band (h, w, C)) for every s in `starts`; a
        pixel in several windows counts once per window. One pass over the band's columns, much
        cheaper than one reduction per patch."""
        if not self._exact:
            for start in starts:
                self._float_moments.add_pixels(band[:, start:start + width].reshape(-1, self._num_channels))
            return
        edges = np.zeros(band.shape[1] + 1, np.int64)
        np.add.at(edges, starts, 1)
        np.add.at(edges, np.asarray(starts) + width, -1)
        weights = np.cumsum(edges[:-1])  # windows covering each column
        height = band.shape[0]
        # Column sums of x and x^2 in the narrowest unsigned types that cannot overflow (for uint8
        # bands of up to 257 rows, uint16 and uint32); einsum multiplies and sums in one pass.
        largest = int(np.iinfo(band.dtype).max)
        sum_dtype, column_max = _unsigned_for(height * largest), height * largest**2
        square_dtype = _unsigned_for(column_max)
        sums, squares = np.zeros(self._num_channels, object), np.zeros(self._num_channels, object)
        for c0 in range(0, band.shape[1], self.COLUMN_CHUNK):
            chunk_weights = weights[c0:c0 + self.COLUMN_CHUNK]
            if not chunk_weights.any():
                continue
            values = band[:, c0:c0 + self.COLUMN_CHUNK]
            column_sums = np.add.reduce(values, axis=0, dtype=sum_dtype)                    # (w, C)
            column_squares = np.einsum("hwc,hwc->wc", values, values, dtype=square_dtype)  # (w, C)
            # Weighted totals in uint64 where they fit, else in Python ints.
            total_dtype = np.uint64 if column_max * int(chunk_weights.sum()) < 2**64 else object
            chunk_weights = chunk_weights.astype(total_dtype)
            sums += (chunk_weights @ column_sums.astype(total_dtype)).astype(object)
            squares += (chunk_weights @ column_squares.astype(total_dtype)).astype(object)
        self._count += height * int(weights.sum())
        self._sum = [int(a) + int(b) for a, b in zip(self._sum, sums)]
        self._sum_of_squares = [int(a) + int(b) for a, b in zip(self._sum_of_squares, squares)]

    def moments(self) -> ChannelMoments:
        if not self._exact or self._count == 0:
            return self._float_moments
        n = self._count
        mean = np.array([s / n for s in self._sum])
        m2 = np.array([(n * q - s * s) / n for s, q in zip(self._sum, self._sum_of_squares)])
        return ChannelMoments(float(n), mean, m2)


def _unsigned_for(bound: int) -> type:
    """The narrowest numpy unsigned integer type holding every value up to `bound`."""
    return next(t for t in (np.uint16, np.uint32, np.uint64) if bound <= np.iinfo(t).max)


@dataclasses.dataclass(frozen=True)
class ShardPart:
    """One finished array_record file (a slide's, or a whole in-memory split) and its patch rows."""

    path: storage.AnyPath               # a URL's file when the DATA_DIR is one
    rows: Sequence[Mapping[str, Any]]   # a `dataset.patch_row` per record, in record order
    moments: ChannelMoments             # over every pixel of every record of the file


def write_array_record(path: pathlib.Path, records: Iterable[bytes]) -> int:
    """Writes `records` to the array_record file `path` (via a temporary name); returns the count.

    Records are compressed and written on a second thread (the writer releases the GIL), so the
    caller's iterator produces the next records meanwhile; at most `WRITE_AHEAD` wait in between.
    A failure midway removes the temporary file, so `path` is either complete or absent.
    """
    count = 0
    with files.atomic_write(path) as tmp:
        writer = ArrayRecordWriter(os.fspath(tmp), ARRAY_RECORD_OPTIONS)
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one thread: records stay in order
        try:
            pending: collections.deque[concurrent.futures.Future] = collections.deque()
            for record in records:
                pending.append(thread.submit(writer.write, record))
                count += 1
                if len(pending) > WRITE_AHEAD:
                    pending.popleft().result()  # re-raises the writer's error
            for future in pending:
                future.result()
        finally:
            thread.shutdown(cancel_futures=True)  # after a failure, nothing more is written
            writer.close()
    return count


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{dataset.DATASET_NAME}-{split}.{SHARD_SUFFIX}-{index:05d}-of-{num_shards:05d}"


def _check_finite_statistics(data_dir: pathlib.Path, moments: ChannelMoments,
                             channel_names: Sequence[str] | None) -> None:
    """Training normalises with channel_mean / channel_std: a NaN or Inf there would turn every batch
    into NaN, so such statistics are never published (they come from non-finite patch pixels)."""
    bad = np.flatnonzero(~(np.isfinite(moments.mean) & np.isfinite(moments.std)))
    if bad.size:
        names = [channel_names[c] if channel_names else f"channel_{c}" for c in bad.tolist()]
        raise DatasetError(f"{data_dir}: split 'train', channel(s) {names}: the channel statistics "
                           "(channel_mean / channel_std) are not finite; the patches hold NaN or Inf pixels")


def finalize_dataset(
    data_dir: str | os.PathLike | storage.RemotePath,
    parts_by_split: Mapping[str, Sequence[ShardPart]],
    features: tfds.features.FeaturesDict,
    metadata: Mapping[str, Any],
) -> dict[str, int]:
    """Publishes finished array_record files as the TFDS dataset in `data_dir`; returns split sizes.

    Shard i of split s is `parts_by_split[s][i]` (callers order them, e.g. by slide id). Parts
    without records and splits without parts are left out (TFDS cannot read an empty shard).
    `channel_mean` / `channel_std` are added to `metadata` (code names) from the train parts' moments.

    Everything is staged under `data_dir/.work/finalize` and moved in with renames: the old
    dataset_info.json goes first, the new one comes last, so a reader never loads a mix.
    `data_dir` may be a URL (`storage.location`; the parts' paths are then on the same file system):
    the shards are copied there (server-side on object stores), the tables written locally and uploaded.
    """
    data_dir = storage.location(data_dir)
    unknown = sorted(set(parts_by_split) - set(dataset.SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {list(dataset.SPLITS)}")
    parts_by_split = {split: [p for p in parts if p.rows] for split, parts in parts_by_split.items()}
    parts_by_split = {split: parts for split, parts in parts_by_split.items() if parts}
    if "train" not in parts_by_split:
        raise DatasetError(f"{data_dir}: the train split has no patches, so the channel statistics "
                           "(channel_mean / channel_std) cannot be computed")
    moments = ChannelMoments()
    for part in parts_by_split["train"]:
        moments.merge_moments(part.moments)
    _check_finite_statistics(data_dir, moments, metadata.get("channel_names"))
    metadata = dict(metadata, channel_mean=moments.mean.tolist(), channel_std=moments.std.tolist())

    staging = data_dir / ".work" / "finalize"
    storage.remove_tree(staging)
    staging.mkdir(parents=True)
    split_infos, rows_by_split = [], {}
    for split in (s for s in dataset.SPLITS if s in parts_by_split):
        parts = parts_by_split[split]
        for i, part in enumerate(parts):
            storage.copy(part.path, staging / shard_name(split, i, len(parts)))
        split_infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[len(p.rows) for p in parts],
            num_bytes=sum(storage.size(p.path) for p in parts)))
        rows_by_split[split] = [row for part in parts for row in part.rows]
    with tempfile.TemporaryDirectory(prefix="finalize-") as local:
        # The TFDS metadata writer and the table writer write local files; at a URL they are written
        # to a local folder and uploaded. TFDS takes the shard names from the folder's files: there
        # they are empty stand-ins for the shards staged at the URL.
        tables = staging if isinstance(staging, pathlib.Path) else pathlib.Path(local)
        shard_names = {p.name for p in staging.iterdir()}
        if tables != staging:
            for name in shard_names:
                (tables / name).touch()
        dataset.write_patch_table(tables / dataset.PATCHES_CSV, rows_by_split)
        tfds.folder_dataset.write_metadata(
            data_dir=tables, features=features, split_infos=split_infos,
            filename_template=FILENAME_TEMPLATE, check_data=False,
            metadata=tfds.core.MetadataDict(dataset.to_disk(metadata)))
        if tables != staging:
            for table in sorted(tables.iterdir()):
                if table.name not in shard_names:
                    storage.upload(table, staging / table.name)

    (data_dir / dataset.DATASET_INFO_FILE).unlink(missing_ok=True)
    staged = sorted(p.name for p in staging.iterdir())
    for old in data_dir.glob(f"{dataset.DATASET_NAME}-*.{SHARD_SUFFIX}-*"):
        if old.name not in staged:
            old.unlink()
    # Shards first, then the tables, dataset_info.json last.
    order = sorted(staged, key=lambda n: (not n.startswith(dataset.DATASET_NAME + "-"),
                                          n == dataset.DATASET_INFO_FILE))
    for name in order:
        storage.replace(staging / name, data_dir / name)
    # rename() between two links of one inode (a shard republished unchanged) leaves the source.
    storage.remove_tree(staging)
    return {split: len(rows) for split, rows in rows_by_split.items()}


def write_patch_dataset(
    data_dir: str | os.PathLike,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    channel_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes in-memory patches as the DATA_DIR layout, through the tiler's code path.

    `splits` maps a split name to fields (code names): image [N, P, P, C] (uint8 / uint16 / float32),
    and every field of `dataset.PATCH_FIELDS`: label [N], tumour_fraction [N], tissue_ratio [N],
    slide_id [N], patient_id [N], x [N], y [N]. `metadata` (code names) adds to / overrides the defaults
    (stride = P, level 0, level_downsample 1, min_tumour_pixels 1, min_tissue_ratio 0.0); patch_size,
    source_dtype and the channel statistics always come from the arrays.
    """
    data_dir = pathlib.Path(data_dir)
    fields = ("image", *dataset.PATCH_FIELDS)
    shapes = set()
    for split, arrays in splits.items():
        missing = sorted(set(fields) - set(arrays))
        if missing:
            raise ValueError(f"split {split!r} lacks field(s) {missing}")
        image = np.asarray(arrays["image"])
        if image.ndim != 4 or image.shape[1] != image.shape[2]:
            raise ValueError(f"split {split!r}: image must be [N, P, P, C], got shape {image.shape}")
        lengths = {name: len(arrays[name]) for name in fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"split {split!r}: fields have different lengths {lengths}")
        shapes.add((image.shape[1:], image.dtype))
    if len(shapes) != 1:
        raise ValueError(f"splits disagree on patch shape / dtype: {sorted(map(str, shapes))}")
    (patch_size, _, num_channels), dtype = shapes.pop()
    if len(channel_names) != num_channels:
        raise ValueError(f"{len(channel_names)} channel names {list(channel_names)} for "
                         f"{num_channels} channels")

    features = patch_features(patch_size, num_channels, dtype)
    serialize = PatchSerializer(features)
    work = data_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    parts_by_split = {}
    for split, arrays in splits.items():
        rows = [dataset.patch_row(*(arrays[name][i] for name in dataset.PATCH_FIELDS))
                for i in range(len(arrays["image"]))]
        images = np.asarray(arrays["image"])
        path = work / f"in_memory-{split}.{SHARD_SUFFIX}"
        write_array_record(path, (serialize({"image": images[i], **rows[i]}) for i in range(len(rows))))
        statistics = PixelStatistics(num_channels, dtype)
        for image in images:
            statistics.add(image)
        parts_by_split[split] = [ShardPart(path, rows, statistics.moments())]
    full_metadata = {"channel_names": list(channel_names), "patch_size": int(patch_size),
                     "stride": int(patch_size), "level": 0, "level_downsample": 1,
                     "source_dtype": np.dtype(dtype).name, "min_tumour_pixels": 1,
                     "min_tissue_ratio": 0.0}
    full_metadata.update(metadata or {})
    full_metadata.update(patch_size=int(patch_size), source_dtype=np.dtype(dtype).name)
    finalize_dataset(data_dir, parts_by_split, features, full_metadata)
    for parts in parts_by_split.values():
        for part in parts:
            part.path.unlink()
    if not any(work.iterdir()):
        work.rmdir()
