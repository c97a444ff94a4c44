"""The dataset contract: what a DATA_DIR holds, and the only reader of its tables.

A DATA_DIR is written by `gerne-jax tile` (or `data_pipeline.shards.write_patch_dataset`)
and read by training, evaluation and `data_pipeline stats`. Everything both sides must agree on is
declared here and nowhere else (docs/design.md §2):

    DATA_DIR/gerne_patches-{split}.array_record-{i:05d}-of-{n:05d}   TFDS shards, one example per patch
    DATA_DIR/dataset_info.json, features.json, metadata.json          TFDS metadata (written last)
    DATA_DIR/patches.csv                                              one row per patch, no pixels
    DATA_DIR/tiling_report.json                                       tiler settings, each slide's split
                                                                      (gerne_jax/slides/tiling_report.py)

Example `i` of split `s` in the shards is the row of patches.csv with `split == s` and `index == i`.

Names: the code spells "tumour" everywhere. The on-disk format keeps the names of its first version
(`tumor_fraction` in patches.csv and the shards, `min_tumor_pixels` in the metadata) so that every
DATA_DIR written so far stays readable; `ON_DISK_NAMES` maps one to the other in this module only.

Groups (the data definitions of the method): a patch's spurious attribute is its tissue ratio binned
by thresholds, `a = #{tau : r >= tau}`, and its group is `(y, a)`, numbered `y * A + a`.

Plain numpy and JSON: no TensorFlow, so the data pipeline and light tools import it cheaply.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gerne_jax.core.errors import InputError

DATASET_NAME = "gerne_patches"
SPLITS = ("train", "validation", "test")
CLASS_NAMES = ("non_tumour", "tumour")  # label y = index; 1 means the patch holds tumour pixels
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

PATCHES_CSV = "patches.csv"
DATASET_INFO_FILE = "dataset_info.json"  # what makes a folder loadable by TFDS; written last
METADATA_FILE = "metadata.json"          # TFDS's file for `builder.info.metadata`

# Per-patch fields, in patches.csv column order, and their dtypes. The shards hold them too, plus `image`.
PATCH_FIELDS: dict[str, np.dtype] = {
    "slide_id": np.dtype(str), "patient_id": np.dtype(str), "x": np.dtype(np.int64),
    "y": np.dtype(np.int64), "label": np.dtype(np.int32), "tumour_fraction": np.dtype(np.float32),
    "tissue_ratio": np.dtype(np.float32)}
# Code name -> on-disk name, for names whose on-disk spelling predates the code's (see above).
ON_DISK_NAMES = {"tumour_fraction": "tumor_fraction", "min_tumour_pixels": "min_tumor_pixels"}
PATCH_COLUMNS = ("split", "index", *(ON_DISK_NAMES.get(name, name) for name in PATCH_FIELDS))

# metadata.json keys (code names), as the tiler writes them.
METADATA_KEYS = ("channel_names", "patch_size", "stride", "level", "level_downsample", "source_dtype",
                 "min_tumour_pixels", "min_tissue_ratio", "channel_mean", "channel_std",
                 "mpp")  # microns per pixel of the patches: --mpp, or the slides' common scale; None if unknown


class DatasetError(InputError):
    """A DATA_DIR that is missing, incomplete or inconsistent; the message names the file."""


def on_disk(name: str) -> str:
    """The on-disk spelling of a field or metadata key."""
    return ON_DISK_NAMES.get(name, name)


def to_disk(record: Mapping[str, Any]) -> dict[str, Any]:
    """A patch row, example or metadata dict under code names -> the same under on-disk names."""
    return {on_disk(key): value for key, value in record.items()}


def from_disk(record: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `to_disk`: a dict read from disk -> the same under code names."""
    code_names = {disk: code for code, disk in ON_DISK_NAMES.items()}
    return {code_names.get(key, key): value for key, value in record.items()}


def read_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The DATA_DIR's metadata (channel names, mean and std, patch size, ...) under code names."""
    path = pathlib.Path(data_dir) / METADATA_FILE
    if not (pathlib.Path(data_dir) / DATASET_INFO_FILE).is_file():
        raise DatasetError(f"{data_dir} is not a dataset: {DATASET_INFO_FILE} is missing (write one with "
                           "`gerne-jax tile`)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the dataset metadata ({error})") from None
    return from_disk(stored)


def read_patch_table(data_dir: str | os.PathLike, split: str | None = None) -> dict[str, np.ndarray]:
    """patches.csv as typed columns (code names), all splits or one split in index order.

    Without `split` the table also has `split` (str) and `index` (int64) columns, in file order.
    """
    path = pathlib.Path(data_dir) / PATCHES_CSV
    if not path.is_file():
        raise DatasetError(f"{path} is missing; is {data_dir} a dataset written by "
                           "`gerne-jax tile`?")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; a dataset has the splits {list(SPLITS)}")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = sorted(set(PATCH_COLUMNS) - set(reader.fieldnames or ()))
        if missing:
            raise DatasetError(f"{path} lacks the column(s) {missing}")
        rows = [row for row in reader if split is None or row["split"] == split]
    table = {"split": np.array([row["split"] for row in rows], dtype=str),
             "index": np.array([row["index"] for row in rows], dtype=np.int64)}
    for name, dtype in PATCH_FIELDS.items():
        table[name] = np.array([row[on_disk(name)] for row in rows], dtype=str).astype(dtype)
    if split is None:
        return table
    order = np.argsort(table["index"], kind="stable")
    if not np.array_equal(table["index"][order], np.arange(order.size)):
        raise DatasetError(f"{path}: the indices of split {split!r} are not 0..{order.size - 1} without gaps")
    return {name: values[order] for name, values in table.items() if name not in ("split", "index")}


def patch_row(slide_id: str, patient_id: str | None, x: int, y: int, label: int,
              tumour_fraction: float, tissue_ratio: float) -> dict[str, Any]:
    """One patch's fields (code names) with the float32 values exactly as stored."""
    return {"slide_id": str(slide_id), "patient_id": str(patient_id or ""), "x": int(x), "y": int(y),
            "label": int(label), "tumour_fraction": float(np.float32(tumour_fraction)),
            "tissue_ratio": float(np.float32(tissue_ratio))}


def write_patch_table(path: str | os.PathLike, rows_by_split: dict[str, Sequence[dict[str, Any]]]) -> None:
    """Writes patches.csv: per split (in SPLITS order), its rows (`patch_row`s) numbered 0, 1, ..."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(PATCH_COLUMNS)
        for split in (s for s in SPLITS if s in rows_by_split):
            for index, row in enumerate(rows_by_split[split]):
                writer.writerow([split, index, *(row[name] for name in PATCH_FIELDS)])


# ---------------------------------------------------------------------------------------------------
# Groups: the spurious attribute binned from the tissue ratio.
# ---------------------------------------------------------------------------------------------------
def attribute_from_tissue_ratio(tissue_ratio: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    """Bins tissue ratios by thresholds: `a = #{tau in taus : r >= tau}`, int32 in `[0, len(taus)]`.

    With one threshold this is `a = 1[r >= tau]`.
    """
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or taus.size == 0:
        raise ValueError(f"taus must be a non-empty list of thresholds, got {taus.tolist()!r}")
    if not np.all(np.isfinite(taus)) or np.any(np.diff(taus) <= 0):
        raise ValueError(f"taus must be finite and strictly increasing, got {taus.tolist()!r}")
    tissue_ratio = np.asarray(tissue_ratio, dtype=np.float64)
    if not np.all(np.isfinite(tissue_ratio)):
        raise ValueError("tissue_ratio holds NaN or infinite values")
    return np.searchsorted(taus, tissue_ratio, side="right").astype(np.int32)


def tissue_bin_names(taus: Sequence[float]) -> tuple[str, ...]:
    """Readable names of the bins made by `attribute_from_tissue_ratio`."""
    edges = [f"{tau:g}" for tau in taus]
    return (f"r < {edges[0]}",
            *(f"{low} <= r < {high}" for low, high in zip(edges[:-1], edges[1:])),
            f"r >= {edges[-1]}")


def _check_codes(values: np.ndarray, count: int, what: str) -> np.ndarray:
    """Integer codes in [0, count) as int64, or a ValueError naming the first bad example."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{what} must hold one integer per example, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
    bad = np.flatnonzero((values < 0) | (values >= count))
    if bad.size:
        raise ValueError(f"{what} must lie in [0, {count - 1}]; example {bad[0]} has {values[bad[0]]}")
    return values.astype(np.int64)


def group_ids(label: np.ndarray, attribute: np.ndarray, num_classes: int, num_attributes: int) -> np.ndarray:
    """Group id `g = y * A + a` of every example, int32 in `[0, K * A)`."""
    label = _check_codes(label, num_classes, "label")
    attribute = _check_codes(attribute, num_attributes, "attribute")
    if label.shape != attribute.shape:
        raise ValueError(f"label ({label.size}) and attribute ({attribute.size}) differ in length")
    return (label * num_attributes + attribute).astype(np.int32)


def group_counts(label: np.ndarray, attribute: np.ndarray, num_classes: int, num_attributes: int) -> np.ndarray:
    """Examples per group, int64 `[K, A]`."""
    ids = group_ids(label, attribute, num_classes, num_attributes)
    return np.bincount(ids, minlength=num_classes * num_attributes).reshape(num_classes, num_attributes)


def largest_remainder(shares: np.ndarray, total: int, normalise: bool = True) -> np.ndarray:
    """Rounds each row of `shares * total` to non-negative integers that sum exactly to `total`.

    Hamilton's method: floor every quota, then give the missing units to the largest remainders (ties go
    to the lower column). Among all integer rows summing to `total` this minimises the distance to the
    quotas. Used for the batch composition and the split sizes. Rows are normalised to sum 1 first
    unless `normalise=False`: split fractions are already shares of 1 (checked to a tolerance), and
    dividing by their floating-point sum would move exact ties (0.2 + 0.7 + 0.1 < 1 in floats).
    """
    shares = np.atleast_2d(np.asarray(shares, dtype=np.float64))
    if not np.all(np.isfinite(shares)) or np.any(shares < 0):
        raise ValueError(f"shares must be finite and non-negative, got {shares.tolist()}")
    row_sums = shares.sum(axis=1, keepdims=True)
    if np.any(row_sums <= 0):
        raise ValueError(f"every row of shares needs a positive sum, got {shares.tolist()}")
    quotas = (shares / row_sums if normalise else shares) * total
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(counts - quotas, axis=1, kind="stable")  # largest remainder first
    for row, missing in enumerate(total - counts.sum(axis=1)):
        counts[row, order[row, :missing]] += 1
    return counts
