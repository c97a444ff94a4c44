"""Tests of gerne_jax.input_pipeline: paired batches per the plan, resume, process shares, eval, DATA_DIR.

Images encode their own example index (every pixel of image i holds i in channel 0), so each test reads
back which examples a batch holds and checks labels and groups against a brute-force computation.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_pipeline import shards
from gerne_jax import groups, input_pipeline

TAUS = [0.1]


def make_examples(num_examples: int = 3000, patch_size: int = 2, seed: int = 0):
    """Tumour patches mostly full of tissue, non-tumour mostly small: the spurious correlation."""
    rng = np.random.default_rng(seed)
    label = (rng.uniform(size=num_examples) < 0.4).astype(np.int64)
    large = rng.uniform(size=num_examples) < np.where(label == 1, 0.9, 0.2)
    tissue_ratio = np.where(large, rng.uniform(0.1, 1.0, num_examples), rng.uniform(0.001, 0.0999, num_examples))
    images = np.zeros((num_examples, patch_size, patch_size, 2), np.float32)
    images[..., 0] = np.arange(num_examples)[:, None, None]
    images[..., 1] = rng.normal(size=(num_examples, patch_size, patch_size))
    return images, label, tissue_ratio.astype(np.float32)


def make_plan(label, attribute, batch_per_group=32, **kwargs):
    counts = groups.group_counts(label, attribute, 2, 1 + attribute.max())
    config = dict(c=0.5, beta=1.0, corr=0.5) | kwargs
    return groups.make_batch_plan(counts, batch_per_group=batch_per_group, **config)


def stream(images, label, attribute, plan, **kwargs):
    config = dict(seed=7, channel_mean=[0.0, 0.0], channel_std=[1.0, 1.0]) | kwargs
    return input_pipeline.train_dataset(images, label, attribute, plan, **config).as_numpy_iterator()


def decode_index(image: np.ndarray) -> np.ndarray:
    """Example index from channel 0 of normalised (mean 0, std 1) index-encoded images."""
    return np.rint(image[..., 0, 0, 0]).astype(np.int64)


def test_paired_batches_follow_plan_over_2000_steps():
    images, label, ratio = make_examples()
    attribute = (ratio >= TAUS[0]).astype(np.int64)                 # brute-force attribute
    plan = make_plan(label, attribute, batch_per_group=32)
    alpha = np.array([[np.mean(attribute[label == y] == a) for a in range(2)] for y in range(2)])
    spec_shares = np.stack([alpha, 0.5 * alpha + 0.5 / 2]) / 2       # share of the whole batch, K = 2
    batches = stream(images, label, attribute, plan)
    for _ in range(2000):
        batch = next(batches)
        index = decode_index(batch["image"])
        np.testing.assert_array_equal(batch["label"], label[index])
        np.testing.assert_array_equal(batch["group"], 2 * label[index] + attribute[index])
        for which in range(2):
            classes = np.bincount(batch["label"][which], minlength=2)
            np.testing.assert_array_equal(classes, [64, 64])         # class-balanced: A * B each
            shares = np.bincount(batch["group"][which], minlength=4).reshape(2, 2) / 128
            assert np.max(np.abs(shares - spec_shares[which])) < 0.01


def test_sampler_overlap_window():
    images, label, ratio = make_examples(seed=1)
    attribute = (ratio >= TAUS[0]).astype(np.int64)
    group = 2 * label + attribute
    for corr in (0.0, 0.5, 1.0):
        plan = make_plan(label, attribute, batch_per_group=16, corr=corr, c=1.0, beta=0.0)
        sampler = input_pipeline.PairedIndexSampler(plan, label, attribute, seed=3)
        shared = np.zeros(4)
        for step in range(200):
            biased, less_biased = sampler(step)
            for g in range(4):
                in_b, in_lb = set(biased[group[biased] == g]), set(less_biased[group[less_biased] == g])
                assert len(in_b | in_lb) <= plan.window_sizes.flat[g]
                shared[g] += len(in_b & in_lb)
        if corr == 0.0:
            assert shared.sum() == 0                                 # disjoint window halves
        else:
            assert np.all(shared > 0)
    np.testing.assert_array_equal(plan.window_sizes, np.maximum(plan.biased_counts, plan.less_biased_counts))


def test_small_group_repeats_members():
    label = np.array([0] * 50 + [1] * 50)
    attribute = np.array([0] * 48 + [1] * 2 + [1] * 50)               # group (0, 1) has 2 members
    plan = groups.make_batch_plan(groups.group_counts(label, attribute, 2, 2), c=1.0, beta=0.0,
                                  batch_per_group=8, empty_group="drop")
    sampler = input_pipeline.PairedIndexSampler(plan, label, attribute, seed=0)
    _, less_biased = sampler(0)
    assert set(less_biased[(label[less_biased] == 0) & (attribute[less_biased] == 1)]) <= {48, 49}
    assert np.sum((label[less_biased] == 0) & (attribute[less_biased] == 1)) == 8


def test_same_seed_same_stream_and_exact_resume():
    images, label, ratio = make_examples(num_examples=600)
    attribute = groups.attribute_from_tissue_ratio(ratio, TAUS)
    plan = make_plan(label, attribute, batch_per_group=4)
    fresh = list(itertools.islice(stream(images, label, attribute, plan, flips=True, rotations=True), 12))
    again = list(itertools.islice(stream(images, label, attribute, plan, flips=True, rotations=True), 12))
    resumed = list(itertools.islice(
        stream(images, label, attribute, plan, flips=True, rotations=True, start_step=9), 3))
    other_seed = next(stream(images, label, attribute, plan, seed=8))
    for a, b in zip(fresh, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(fresh[9:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(decode_index(fresh[0]["image"]), decode_index(other_seed["image"]))


def test_each_process_gets_its_contiguous_share():
    images, label, ratio = make_examples(num_examples=600)
    attribute = groups.attribute_from_tissue_ratio(ratio, TAUS)
    plan = make_plan(label, attribute, batch_per_group=4)             # N = 16
    whole = list(itertools.islice(stream(images, label, attribute, plan, process_index=0, process_count=1), 3))
    for count in (2, 4):
        parts = [list(itertools.islice(stream(images, label, attribute, plan, process_index=p,
                                              process_count=count), 3)) for p in range(count)]
        for step in range(3):
            for key in ("image", "label", "group"):
                joined = np.concatenate([part[step][key] for part in parts], axis=1)
                np.testing.assert_array_equal(joined, whole[step][key])
                assert parts[0][step][key].shape[1] == 16 // count
    with pytest.raises(ValueError, match="does not divide among 3 processes"):
        input_pipeline.train_dataset(images, label, attribute, plan, seed=0, channel_mean=[0, 0],
                                     channel_std=[1, 1], process_index=0, process_count=3)


def dihedral_images(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / rotations of an [P, P, C] image."""
    return [np.rot90(flipped, k) for flipped in (image, image[:, ::-1]) for k in range(4)]


@pytest.mark.parametrize("flips, rotations, expected", [(True, True, 8), (False, True, 4), (True, False, 4)])
def test_augmentation_applies_flips_and_rotations(flips, rotations, expected):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(200, 4, 4, 2)).astype(np.float32)
    label = np.arange(200) % 2
    attribute = (np.arange(200) // 2) % 2
    plan = make_plan(label, attribute, batch_per_group=8)
    plain = list(itertools.islice(stream(images, label, attribute, plan), 4))
    augmented = list(itertools.islice(stream(images, label, attribute, plan, flips=flips, rotations=rotations), 4))
    seen = set()
    for a, b in zip(plain, augmented):
        np.testing.assert_array_equal(a["label"], b["label"])        # same examples, transformed
        for original, transformed in zip(a["image"].reshape(-1, 4, 4, 2), b["image"].reshape(-1, 4, 4, 2)):
            matches = [i for i, candidate in enumerate(dihedral_images(original))
                       if np.array_equal(candidate, transformed)]
            assert len(matches) == 1
            seen.add(matches[0])
    allowed = {(True, True): set(range(8)), (False, True): {0, 1, 2, 3}, (True, False): {0, 2, 4, 6}}
    assert seen == allowed[(flips, rotations)] and len(seen) == expected


def test_normalisation_uses_channel_statistics():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 65535, size=(40, 3, 3, 3)).astype(np.uint16)
    label, attribute = np.arange(40) % 2, (np.arange(40) // 2) % 2
    plan = make_plan(label, attribute, batch_per_group=2)
    mean, std = np.array([1000.0, 30000.0, 5.0]), np.array([50.0, 9000.0, 2.0])
    sampler = input_pipeline.PairedIndexSampler(plan, label, attribute, seed=7)
    batch = next(stream(images, label, attribute, plan, channel_mean=mean, channel_std=std))
    expected = (images[sampler(0)].astype(np.float64) - mean) / std
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="channel 1 has mean .* std 0"):
        input_pipeline.train_dataset(images, label, attribute, plan, seed=0, channel_mean=mean,
                                     channel_std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="one value per image channel"):
        input_pipeline.train_dataset(images, label, attribute, plan, seed=0, channel_mean=[0.0],
                                     channel_std=[1.0])


def test_plan_from_other_data_is_refused():
    images, label, ratio = make_examples(num_examples=300)
    attribute = groups.attribute_from_tissue_ratio(ratio, TAUS)
    plan = make_plan(label, attribute)
    with pytest.raises(ValueError, match="the plan was made for group counts"):
        input_pipeline.PairedIndexSampler(plan, label, 1 - attribute, seed=0)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(process_count):
    images, label, ratio = make_examples(num_examples=103)
    batch_size = 16
    seen = []
    for process in range(process_count):
        batches = list(input_pipeline.eval_dataset(
            images, label, batch_size=batch_size, channel_mean=[0, 0], channel_std=[1, 1],
            fields={"tissue_ratio": ratio}, process_index=process,
            process_count=process_count).as_numpy_iterator())
        assert len(batches) == 7                                     # ceil(103 / 16), same on every process
        for batch in batches:
            assert batch["image"].shape == (batch_size // process_count, 2, 2, 2)
            valid = batch["valid"]
            index = batch["index"][valid]
            np.testing.assert_array_equal(decode_index(batch["image"][valid]), index)
            np.testing.assert_array_equal(batch["label"][valid], label[index])
            np.testing.assert_array_equal(batch["tissue_ratio"][valid], ratio[index])
            assert np.all(batch["index"][~valid] == -1)
            seen.extend(index.tolist())
    assert sorted(seen) == list(range(103))


def write_data_dir(path, images, label, ratio):
    """A DATA_DIR via the shard writer (train: all examples, validation: the first 30)."""
    count = label.size
    def fields(n):
        return {"image": images[:n], "label": label[:n], "tumor_fraction": label[:n] * 0.5,
                "tissue_ratio": ratio[:n], "slide_id": np.array([f"s{i % 3}" for i in range(n)]),
                "patient_id": np.array([f"p{i % 2}" for i in range(n)]), "x": np.arange(n) * 64,
                "y": np.arange(n) * 32}
    shards.write_patch_dataset(path, {"train": fields(count), "validation": fields(30)},
                               channel_names=["index", "noise"])


def test_data_dir_in_memory_and_lazy_give_the_same_stream(tmp_path):
    images, label, ratio = make_examples(num_examples=200)
    images = images.astype(np.float32)
    write_data_dir(tmp_path, images, label, ratio)
    metadata = input_pipeline.read_metadata(tmp_path)
    np.testing.assert_allclose(metadata["channel_mean"], images.reshape(-1, 2).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(metadata["channel_std"], images.reshape(-1, 2).std(axis=0), rtol=1e-5)
    memory = input_pipeline.load_split(tmp_path, "train")
    lazy = input_pipeline.load_split(tmp_path, "train", in_memory=False)
    np.testing.assert_array_equal(memory["image"], images)
    np.testing.assert_array_equal(lazy["image"][np.array([5, 0, 5, 199])], images[[5, 0, 5, 199]])
    for split in (memory, lazy):
        np.testing.assert_array_equal(split["label"], label)
        np.testing.assert_allclose(split["tissue_ratio"], ratio)
        np.testing.assert_array_equal(split["x"], np.arange(200) * 64)
        assert split["slide_id"][4] == "s1" and split["patient_id"][3] == "p1"
    validation = input_pipeline.load_split(tmp_path, "validation")
    np.testing.assert_array_equal(validation["image"], images[:30])

    attribute = groups.attribute_from_tissue_ratio(memory["tissue_ratio"], TAUS)
    plan = make_plan(memory["label"], attribute, batch_per_group=4)
    from_memory = list(itertools.islice(stream(memory["image"], memory["label"], attribute, plan), 3))
    from_shards = list(itertools.islice(stream(lazy["image"], lazy["label"], attribute, plan), 3))
    for a, b in zip(from_memory, from_shards):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="no split 'test'"):
        input_pipeline.load_split(tmp_path, "test")
