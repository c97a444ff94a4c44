"""Tests of data_pipeline.shards: the DATA_DIR layout read back through TFDS, tf.data and patches.csv."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipeline import shards
from gerne_jax.data import dataset


def random_split(rng: np.random.Generator, n: int, patch: int, channels: int, dtype, slide_prefix: str):
    if np.dtype(dtype).kind == "f":
        image = rng.normal(3.0, 2.0, size=(n, patch, patch, channels)).astype(dtype)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, size=(n, patch, patch, channels), endpoint=True).astype(dtype)
    return {
        "image": image,
        "label": rng.integers(0, 2, n),
        "tumour_fraction": rng.random(n).astype(np.float32),
        "tissue_ratio": rng.random(n),
        "slide_id": np.array([f"{slide_prefix}{i % 3}" for i in range(n)]),
        "patient_id": np.array([f"p{slide_prefix}{i % 2}" for i in range(n)]),
        "x": rng.integers(0, 10**9, n),
        "y": rng.integers(0, 10**9, n),
    }


def read_csv(data_dir) -> list[dict]:
    with open(os.path.join(data_dir, "patches.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_write_patch_dataset_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    splits = {"train": random_split(rng, 7, 6, 5, dtype, "a"),
              "validation": random_split(rng, 3, 6, 5, dtype, "b"),
              "test": random_split(rng, 4, 6, 5, dtype, "c")}
    names = [f"ch{c}" for c in range(5)]
    shards.write_patch_dataset(tmp_path, splits, names, metadata={"stride": 3})

    builder = tfds.builder_from_directory(os.fspath(tmp_path))
    assert builder.info.name == "gerne_patches"
    assert sorted(builder.info.splits) == ["test", "train", "validation"]
    assert builder.info.features["label"].names == ["non_tumour", "tumour"]
    meta = builder.info.metadata
    train_images = splits["train"]["image"].astype(np.float64)
    np.testing.assert_allclose(meta["channel_mean"], train_images.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(meta["channel_std"], train_images.std(axis=(0, 1, 2)), rtol=1e-10)
    assert meta["channel_names"] == names
    assert (meta["patch_size"], meta["stride"], meta["level"], meta["level_downsample"]) == (6, 3, 0, 1)
    assert meta["source_dtype"] == np.dtype(dtype).name

    rows = read_csv(tmp_path)
    assert [r["split"] for r in rows] == ["train"] * 7 + ["validation"] * 3 + ["test"] * 4
    for split, arrays in splits.items():
        source = builder.as_data_source(split)
        assert len(source) == len(arrays["image"])
        split_rows = [r for r in rows if r["split"] == split]
        for i in range(len(source)):
            example, row = source[i], split_rows[i]
            assert int(row["index"]) == i
            assert example["image"].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(example["image"], arrays["image"][i])
            assert example["label"] == arrays["label"][i] == int(row["label"])
            assert example["x"] == arrays["x"][i] == int(row["x"])
            assert example["y"] == arrays["y"][i] == int(row["y"])
            assert example["slide_id"].decode() == arrays["slide_id"][i] == row["slide_id"]
            assert example["patient_id"].decode() == arrays["patient_id"][i] == row["patient_id"]
            for field in ("tumour_fraction", "tissue_ratio"):
                stored = dataset.on_disk(field)
                assert example[stored] == np.float32(arrays[field][i]) == np.float32(row[stored])


def test_on_disk_names_are_the_first_versions(tmp_path):
    """DATA_DIRs written before the code said "tumour" stay readable: the files keep "tumor"."""
    rng = np.random.default_rng(8)
    shards.write_patch_dataset(tmp_path, {"train": random_split(rng, 2, 4, 1, np.uint8, "a")}, ["gray"],
                               metadata={"min_tumour_pixels": 3})
    with open(tmp_path / "patches.csv", newline="") as f:
        assert next(csv.reader(f)) == ["split", "index", "slide_id", "patient_id", "x", "y", "label",
                                       "tumor_fraction", "tissue_ratio"]
    info = tfds.builder_from_directory(os.fspath(tmp_path)).info
    assert "tumor_fraction" in info.features and "tumour_fraction" not in info.features
    assert info.metadata["min_tumor_pixels"] == 3 and "min_tumour_pixels" not in info.metadata
    assert dataset.read_metadata(tmp_path)["min_tumour_pixels"] == 3


def test_tf_data_decodes_the_same_records(tmp_path):
    """TFDS has no `as_dataset` for array_record; tf.data parses the raw records with the features."""
    rng = np.random.default_rng(1)
    splits = {"train": random_split(rng, 5, 4, 2, np.uint16, "a")}
    shards.write_patch_dataset(tmp_path, splits, ["a", "b"])
    builder = tfds.builder_from_directory(os.fspath(tmp_path))
    files = sorted(str(p) for p in tmp_path.glob("gerne_patches-train.array_record-*"))
    raw = ArrayRecordDataSource(files)
    records = [raw[i] for i in range(len(raw))]
    dataset = tf.data.Dataset.from_tensor_slices(records).map(builder.info.features.deserialize_example)
    for i, example in enumerate(dataset):
        np.testing.assert_array_equal(example["image"].numpy(), splits["train"]["image"][i])
        assert example["label"].numpy() == splits["train"]["label"][i]
        assert example["x"].numpy() == splits["train"]["x"][i]
    assert i == 4


def test_moments_merge_matches_numpy_on_bright_low_spread_channels():
    rng = np.random.default_rng(2)
    pixels = (60000 + rng.integers(0, 3, size=(4000, 3))).astype(np.float64)
    moments = shards.ChannelMoments()
    for part in np.array_split(pixels[:1300], 7):
        moments.add_pixels(part)
    other = shards.ChannelMoments()
    other.add_pixels(pixels[1300:])
    moments.merge_moments(shards.ChannelMoments.from_json(other.to_json()))
    assert moments.count == len(pixels)
    np.testing.assert_allclose(moments.mean, pixels.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.std, pixels.std(axis=0), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_pixel_statistics_match_numpy(dtype):
    rng = np.random.default_rng(6)
    high = 255 if dtype == np.uint8 else 65535
    patches = rng.integers(0, high, size=(9, 5, 5, 4), endpoint=True).astype(dtype)
    statistics = shards.PixelStatistics(4, dtype)
    for patch in patches:
        statistics.add(patch)
    moments = statistics.moments()
    pixels = patches.reshape(-1, 4).astype(np.float64)
    assert moments.count == len(pixels)
    np.testing.assert_allclose(moments.mean, pixels.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.std, pixels.std(axis=0), rtol=1e-11)
    assert shards.PixelStatistics(4, dtype).moments().count == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_pixel_statistics_of_overlapping_windows_match_numpy(dtype):
    rng = np.random.default_rng(7)
    high = 255 if dtype == np.uint8 else 65535
    band = rng.integers(0, high, size=(6, 5000, 2), endpoint=True).astype(dtype)
    starts = np.array([0, 3, 4, 10, 2100, 2101, 4990])  # overlapping, across column chunks
    statistics = shards.PixelStatistics(2, dtype)
    statistics.add_windows(band, starts, 8)
    statistics.add_windows(band[:, :100], np.array([], np.int64), 8)
    moments = statistics.moments()
    pixels = np.concatenate([band[:, s:s + 8].reshape(-1, 2) for s in starts]).astype(np.float64)
    assert moments.count == len(pixels)
    np.testing.assert_allclose(moments.mean, pixels.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(moments.std, pixels.std(axis=0), rtol=1e-11)


def test_same_arrays_give_byte_identical_shards(tmp_path):
    rng = np.random.default_rng(3)
    splits = {"train": random_split(rng, 6, 5, 3, np.uint8, "a"), "test": random_split(rng, 2, 5, 3, np.uint8, "b")}
    shards.write_patch_dataset(tmp_path / "one", splits, ["r", "g", "b"])
    shards.write_patch_dataset(tmp_path / "two", splits, ["r", "g", "b"])
    names = sorted(p.name for p in (tmp_path / "one").glob("gerne_patches-*"))
    assert names == ["gerne_patches-test.array_record-00000-of-00001",
                     "gerne_patches-train.array_record-00000-of-00001"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_rewrite_replaces_old_shards_and_drops_empty_split(tmp_path):
    rng = np.random.default_rng(4)
    first = {"train": random_split(rng, 4, 4, 1, np.uint8, "a"), "test": random_split(rng, 2, 4, 1, np.uint8, "b")}
    shards.write_patch_dataset(tmp_path, first, ["gray"])
    second = {"train": random_split(rng, 3, 4, 1, np.uint8, "c"), "test": random_split(rng, 0, 4, 1, np.uint8, "d")}
    shards.write_patch_dataset(tmp_path, second, ["gray"])
    builder = tfds.builder_from_directory(os.fspath(tmp_path))
    assert list(builder.info.splits) == ["train"]
    assert [p.name for p in tmp_path.glob("gerne_patches-*")] == ["gerne_patches-train.array_record-00000-of-00001"]
    source = builder.as_data_source("train")
    np.testing.assert_array_equal(np.stack([source[i]["image"] for i in range(3)]), second["train"]["image"])
    assert [r["split"] for r in read_csv(tmp_path)] == ["train"] * 3
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_bad_inputs_are_named(tmp_path):
    rng = np.random.default_rng(5)
    good = random_split(rng, 3, 4, 2, np.uint8, "a")
    with pytest.raises(ValueError, match="train split has no patches"):
        shards.write_patch_dataset(tmp_path / "a", {"test": good}, ["a", "b"])
    with pytest.raises(ValueError, match="split 'train' lacks field.*'x'"):
        shards.write_patch_dataset(tmp_path / "b", {"train": {k: v for k, v in good.items() if k != "x"}}, ["a", "b"])
    with pytest.raises(ValueError, match="different lengths"):
        shards.write_patch_dataset(tmp_path / "c", {"train": dict(good, label=good["label"][:2])}, ["a", "b"])
    with pytest.raises(ValueError, match="1 channel names"):
        shards.write_patch_dataset(tmp_path / "d", {"train": good}, ["a"])
    with pytest.raises(ValueError, match="unknown split"):
        shards.write_patch_dataset(tmp_path / "e", {"train": good, "holdout": good}, ["a", "b"])
    with pytest.raises(ValueError, match="int32 is not supported"):
        shards.write_patch_dataset(tmp_path / "f", {"train": dict(good, image=good["image"].astype(np.int32))},
                                   ["a", "b"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_patch_serializer_matches_tfds_example_serializer(dtype):
    """The direct proto encoding gives the bytes of TFDS's own ExampleSerializer, field for field."""
    from tensorflow_datasets.core import example_serializer

    rng = np.random.default_rng(9)
    features = shards.patch_features(6, 3, dtype)
    reference = example_serializer.ExampleSerializer(features.get_serialized_info())
    serialize = shards.PatchSerializer(features)
    for i in range(40):
        image = (rng.random((6, 6, 3)) * 60000).astype(dtype)
        row = dataset.patch_row(["s", "slide-é", "x" * 200][i % 3], ["", "p1", "patiënt"][i % 3 - 1],
                                int(rng.integers(0, 2**40)), int(rng.integers(0, 300)), i % 2,
                                float(rng.random()), float(rng.random()) if i % 5 else 1 / 3)
        example = {"image": image[:, ::-1] if i % 4 == 0 else image, **row}  # strided views too
        expected = reference.get_tf_example(features.encode_example(dataset.to_disk(example)))
        assert serialize(example) == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("dtype,height", [(np.uint8, 257), (np.uint8, 300), (np.uint16, 3), (np.uint16, 70)])
def test_pixel_statistics_sums_are_exact(dtype, height):
    """Mean and M2 equal those from Python-integer sums, across the accumulator-width boundaries
    (uint8 sums leave uint16 above 257 rows; uint16 squares need uint64)."""
    rng = np.random.default_rng(height)
    high = np.iinfo(dtype).max
    band = rng.integers(high - 3, high, size=(height, 2300, 2), endpoint=True).astype(dtype)
    starts = np.array([0, 5, 2047, 2200])  # overlapping, across column chunks
    statistics = shards.PixelStatistics(2, dtype)
    statistics.add_windows(band, starts, 90)
    pixels = np.concatenate([band[:, s:s + 90].reshape(-1, 2) for s in starts]).astype(object)
    n, sums, squares = len(pixels), pixels.sum(axis=0), (pixels * pixels).sum(axis=0)
    moments = statistics.moments()
    assert moments.count == n
    assert moments.mean.tolist() == [s / n for s in sums]
    assert moments.m2.tolist() == [(n * q - s * s) / n for s, q in zip(sums, squares)]
