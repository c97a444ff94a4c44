"""Tests of gerne_jax.data.input_pipeline: paired batches per the plan, the rows a method loads, resume,
process shares, evaluation batches, DATA_DIR loading (docs/design.md §2 and §7).

Images encode their own example index (every pixel of image i holds i in channel 0), so each test reads
back which examples a batch holds and checks labels and groups against a brute-force computation.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from configs import tiny
from gerne_jax.data import dataset, groups, input_pipeline, samplers
from gerne_jax.methods import registry
from gerne_jax.train import trainer

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
    counts = dataset.group_counts(label, attribute, 2, 1 + attribute.max())
    config = dict(c=0.5, beta=1.0, corr=0.5) | kwargs
    return groups.make_batch_plan(counts, batch_per_group=batch_per_group, **config)


def stream(images, label, attribute, plan, seed=7, **kwargs):
    sampler = samplers.PairedIndexSampler(plan, label, attribute, seed)
    return input_pipeline.train_dataset(images, label, sampler, **kwargs).as_numpy_iterator()


def decode_index(image: np.ndarray) -> np.ndarray:
    """Example index from channel 0 of index-encoded images."""
    return np.rint(image[..., 0, 0, 0]).astype(np.int64)


def test_paired_batches_follow_plan_over_2000_steps():
    images, label, ratio = make_examples()
    attribute = (ratio >= TAUS[0]).astype(np.int64)                 # brute-force attribute
    plan = make_plan(label, attribute, batch_per_group=32)
    alpha = np.array([[np.mean(attribute[label == y] == a) for a in range(2)] for y in range(2)])
    design_shares = np.stack([alpha, 0.5 * alpha + 0.5 / 2]) / 2     # share of the whole batch, K = 2
    batches = stream(images, label, attribute, plan)
    for _ in range(2000):
        batch = next(batches)
        assert set(batch) == {"image", "label"}
        index = decode_index(batch["image"])
        np.testing.assert_array_equal(batch["label"], label[index])
        group = 2 * label[index] + attribute[index]
        for which in range(2):
            classes = np.bincount(batch["label"][which], minlength=2)
            np.testing.assert_array_equal(classes, [64, 64])         # class-balanced: A * B each
            shares = np.bincount(group[which], minlength=4).reshape(2, 2) / 128
            assert np.max(np.abs(shares - design_shares[which])) < 0.01


def test_sampler_overlap_window():
    images, label, ratio = make_examples(seed=1)
    attribute = (ratio >= TAUS[0]).astype(np.int64)
    group = 2 * label + attribute
    for corr in (0.0, 0.5, 1.0):
        plan = make_plan(label, attribute, batch_per_group=16, corr=corr, c=1.0, beta=0.0)
        sampler = samplers.PairedIndexSampler(plan, label, attribute, seed=3)
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
    plan = groups.make_batch_plan(dataset.group_counts(label, attribute, 2, 2), c=1.0, beta=0.0,
                                  batch_per_group=8, empty_group="drop")
    sampler = samplers.PairedIndexSampler(plan, label, attribute, seed=0)
    _, less_biased = sampler(0)
    assert set(less_biased[(label[less_biased] == 0) & (attribute[less_biased] == 1)]) <= {48, 49}
    assert np.sum((label[less_biased] == 0) & (attribute[less_biased] == 1)) == 8


def test_same_seed_same_stream_and_exact_resume():
    images, label, ratio = make_examples(num_examples=600)
    attribute = dataset.attribute_from_tissue_ratio(ratio, TAUS)
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
    attribute = dataset.attribute_from_tissue_ratio(ratio, TAUS)
    plan = make_plan(label, attribute, batch_per_group=4)             # N = 16
    whole = list(itertools.islice(stream(images, label, attribute, plan, process_index=0, process_count=1), 3))
    for count in (2, 4):
        parts = [list(itertools.islice(stream(images, label, attribute, plan, process_index=p,
                                              process_count=count), 3)) for p in range(count)]
        for step in range(3):
            for key in ("image", "label"):
                joined = np.concatenate([part[step][key] for part in parts], axis=1)
                np.testing.assert_array_equal(joined, whole[step][key])
                assert parts[0][step][key].shape[1] == 16 // count
    with pytest.raises(ValueError, match="does not divide among 3 processes"):
        stream(images, label, attribute, plan, seed=0, process_index=0, process_count=3)


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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_batches_carry_the_source_pixels_unchanged(dtype):
    """Standardisation happens on the device (tests/data/test_normalisation.py): the pipelines hand over the
    drawn examples' pixels bit for bit, in their own dtype."""
    rng = np.random.default_rng(6)
    images = (rng.uniform(0, 250, size=(40, 3, 3, 3)) * (1 if dtype == np.float32 else 100)).astype(dtype)
    images[..., 0] = np.arange(40)[:, None, None]
    label, attribute = np.arange(40) % 2, (np.arange(40) // 2) % 2
    plan = make_plan(label, attribute, batch_per_group=2)
    sampler = samplers.PairedIndexSampler(plan, label, attribute, seed=7)
    batch = next(stream(images, label, attribute, plan))
    assert batch["image"].dtype == dtype
    np.testing.assert_array_equal(batch["image"], images[sampler(0)])
    (natural,) = input_pipeline.natural_batches(images, num_batches=1, batch_size=8, seed=0, step=0).as_numpy_iterator()
    assert natural["image"].dtype == dtype
    np.testing.assert_array_equal(natural["image"], images[decode_index(natural["image"])])
    evaluation_batches = input_pipeline.eval_dataset(images, batch_size=16).as_numpy_iterator()
    evaluated = np.concatenate([b["image"] for b in evaluation_batches])
    assert evaluated.dtype == dtype
    np.testing.assert_array_equal(evaluated[:40], images)


def test_plan_from_other_data_is_refused():
    images, label, ratio = make_examples(num_examples=300)
    attribute = dataset.attribute_from_tissue_ratio(ratio, TAUS)
    plan = make_plan(label, attribute)
    with pytest.raises(ValueError, match="the plan was made for group counts"):
        samplers.PairedIndexSampler(plan, label, 1 - attribute, seed=0)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_in_order(process_count):
    images, _, _ = make_examples(num_examples=103)
    images[..., 0] += 1                                              # index + 1: padding decodes to 0
    batch_size = 16
    per_process = [list(input_pipeline.eval_dataset(
        images, batch_size=batch_size, process_index=process,
        process_count=process_count).as_numpy_iterator()) for process in range(process_count)]
    for batches in per_process:
        assert len(batches) == 7                                     # ceil(103 / 16), same on every process
        for batch in batches:
            assert set(batch) == {"image"}
            assert batch["image"].shape == (batch_size // process_count, 2, 2, 2)
    # Global batch b is the processes' shares of it side by side; the padding sits at the very end.
    joined = np.concatenate([np.concatenate([batches[b]["image"] for batches in per_process])
                             for b in range(7)])
    np.testing.assert_array_equal(decode_index(joined), [*range(1, 104), *[0] * (7 * 16 - 103)])
    np.testing.assert_array_equal(joined[103:], 0)
    np.testing.assert_array_equal(joined[:103], images)


class RecordingImages:
    """An in-memory `ImageSource` that records how many images each read asks for."""

    def __init__(self, images: np.ndarray):
        self.images, self.shape, self.dtype = images, images.shape, images.dtype
        self.reads: list[int] = []

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        self.reads.append(int(np.size(indices)))
        return self.images[indices]


def test_erm_batches_are_the_biased_row_of_gerne_batches():
    """Same seed and plan: ERM's batch of step t is row 0 of GERNE's pair (augmentations included), and
    ERM reads only that row's images."""
    images, label, ratio = make_examples(num_examples=600)
    attribute = dataset.attribute_from_tissue_ratio(ratio, TAUS)
    streams, sources = {}, {}
    for name in ("erm", "gerne"):
        config = tiny.get_config(name)
        config.training.batch_per_group, config.data.flips, config.data.rotations = 4, True, True
        method = registry.get(name)()
        method.prepare({"label": label}, attribute, trainer.Context(config, {}, None))
        sources[name] = RecordingImages(images)
        streams[name] = list(itertools.islice(input_pipeline.train_dataset(
            sources[name], label, method.sampler(config.training.seed), start_step=3, rows=method.rows,
            flips=config.data.flips, rotations=config.data.rotations).as_numpy_iterator(), 4))
        batch_size = method.plan.batch_size                          # N = K * A * B = 16
        assert method.rows == ((0,) if name == "erm" else (0, 1))
        assert sources[name].reads and set(sources[name].reads) == {len(method.rows) * batch_size}
    for erm, gerne in zip(streams["erm"], streams["gerne"]):
        assert erm["image"].shape == (1, 16, 2, 2, 2) and gerne["image"].shape == (2, 16, 2, 2, 2)
        for key in ("image", "label"):
            np.testing.assert_array_equal(erm[key][0], gerne[key][groups.BIASED])


def test_data_dir_in_memory_and_lazy_give_the_same_stream(tiny_data):
    written = tiny_data.splits
    train_images = written["train"]["image"]
    metadata = dataset.read_metadata(tiny_data.path)
    pixels = train_images.reshape(-1, train_images.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(metadata["channel_mean"], pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(metadata["channel_std"], pixels.std(axis=0), rtol=1e-5)
    memory = input_pipeline.load_split(tiny_data.path, "train")
    lazy = input_pipeline.load_split(tiny_data.path, "train", in_memory=False)
    np.testing.assert_array_equal(memory["image"], train_images)
    np.testing.assert_array_equal(lazy["image"][np.array([5, 0, 5, 119])], train_images[[5, 0, 5, 119]])
    for split in (memory, lazy):
        for name, dtype in dataset.PATCH_FIELDS.items():
            np.testing.assert_array_equal(split[name], written["train"][name].astype(dtype))
    validation = input_pipeline.load_split(tiny_data.path, "validation")
    np.testing.assert_array_equal(validation["image"], written["validation"]["image"])

    attribute = dataset.attribute_from_tissue_ratio(memory["tissue_ratio"], TAUS)
    plan = make_plan(memory["label"], attribute, batch_per_group=4)
    from_memory = list(itertools.islice(stream(memory["image"], memory["label"], attribute, plan), 3))
    from_shards = list(itertools.islice(stream(lazy["image"], lazy["label"], attribute, plan), 3))
    for a, b in zip(from_memory, from_shards):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="no split 'bogus'"):
        input_pipeline.load_split(tiny_data.path, "bogus")
