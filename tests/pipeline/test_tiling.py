"""Tests of `python -m data_pipeline tile` against a brute-force numpy loop over the full arrays."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tifffile
from array_record.python.array_record_data_source import ArrayRecordDataSource
from PIL import Image

from data_pipeline import commands
from data_pipeline.__main__ import main
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides import qc, scan
from gerne_jax.slides.grid import scan_plan
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.tissue import detect_tissue
from tests.helpers import REPO
from tests.tiff_layouts import pyramid_levels, write_layout

MANIFEST_COLUMNS = ["slide_id", "image", "channels", "mask", "tissue_mask", "patient_id", "split"]


# ---------------------------------------------------------------------------------------------------
# Test slides and the brute-force truth
# ---------------------------------------------------------------------------------------------------
def blobs(rng: np.random.Generator, shape: tuple[int, int], cell: int, fill: float) -> np.ndarray:
    """Blocky random regions: a coarse random grid upsampled by `cell`, cropped to `shape`."""
    coarse = rng.random((shape[0] // cell + 1, shape[1] // cell + 1)) < fill
    return np.kron(coarse, np.ones((cell, cell), bool))[: shape[0], : shape[1]]


def make_slide(rng: np.random.Generator, shape: tuple[int, int], channels: int, dtype) -> tuple:
    """(image, tumour, tissue_lowres at 1/4): bright tissue on a dark background, tumour inside."""
    tissue_low = blobs(rng, (-(-shape[0] // 4), -(-shape[1] // 4)), 3, 0.4)
    tissue = np.kron(tissue_low, np.ones((4, 4), bool))[: shape[0], : shape[1]]
    tumour = blobs(rng, shape, 7, 0.2) & np.roll(tissue, 3, axis=1)  # reaches outside tissue too
    high = 200 if np.dtype(dtype) == np.uint8 else 3000
    image = rng.integers(0, high // 10, size=shape + (channels,))
    image = image + np.where(tissue, high, 0)[..., None] + rng.integers(0, high // 5, size=shape + (channels,))
    return image.astype(dtype), tumour, tissue_low


def write_mask(path: pathlib.Path, mask: np.ndarray) -> pathlib.Path:
    if path.suffix == ".png":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    else:
        tifffile.imwrite(path, mask.astype(np.uint8))
    return path


def write_manifest(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in MANIFEST_COLUMNS})
    return path


def brute_force(slide_id, patient_id, image, tumour, tissue_full, P, S, d=1, min_tumour_pixels=1,
                min_tissue_ratio=0.0) -> list[dict]:
    """Every kept patch of one slide in row-major grid order, by plain loops over the full arrays (kept by
    `tissue_full` alone; the tumour mask gives only label and tumour fraction)."""
    H, W = tumour.shape
    patches = []
    y = 0
    while y + P <= H:
        x = 0
        while x + P <= W:
            tumour_pixels = int(tumour[y:y + P, x:x + P].sum())
            ratio = tissue_full[y:y + P, x:x + P].sum() / (P * P)
            if ratio > min_tissue_ratio:
                patches.append({"image": image[y:y + P, x:x + P], "label": int(tumour_pixels >= min_tumour_pixels),
                                "tumour_fraction": np.float32(tumour_pixels / (P * P)),
                                "tissue_ratio": np.float32(ratio), "x": x * d, "y": y * d,
                                "slide_id": slide_id, "patient_id": patient_id})
            x += S
        y += S
    return patches


def upsample(lowres: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(lowres, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


def read_csv_rows(data_dir: pathlib.Path) -> list[dict]:
    with open(data_dir / "patches.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_dataset(data_dir: pathlib.Path, expected: dict[str, list[dict]], num_channels: int, dtype) -> None:
    """The dataset read back (data source, tf.data and patches.csv) equals the brute-force patches."""
    builder = tfds.builder_from_directory(os.fspath(data_dir))
    assert sorted(builder.info.splits) == sorted(s for s, p in expected.items() if p)
    rows = read_csv_rows(data_dir)
    for split, patches in expected.items():
        if not patches:
            continue
        source = builder.as_data_source(split)
        split_rows = [r for r in rows if r["split"] == split]
        assert len(source) == len(patches) == len(split_rows)
        files = sorted(str(p) for p in data_dir.glob(f"gerne_patches-{split}.array_record-*"))
        records = ArrayRecordDataSource(files)
        tf_examples = tf.data.Dataset.from_tensor_slices([records[i] for i in range(len(records))]).map(
            builder.info.features.deserialize_example)
        for i, (truth, example, row, tf_example) in enumerate(zip(patches, source, split_rows, tf_examples)):
            assert example["image"].shape == truth["image"].shape and example["image"].dtype == np.dtype(dtype)
            np.testing.assert_array_equal(example["image"], truth["image"])
            np.testing.assert_array_equal(tf_example["image"].numpy(), truth["image"])
            assert int(row["index"]) == i
            for name in ("label", "x", "y"):
                assert example[name] == truth[name] == int(row[name]) == tf_example[name].numpy(), name
            for name in ("tumour_fraction", "tissue_ratio"):
                stored = dataset.on_disk(name)
                assert example[stored] == truth[name] == np.float32(row[stored]) == tf_example[stored].numpy(), name
            for name in ("slide_id", "patient_id"):
                assert example[name].decode() == truth[name] == row[name], name
    train = np.stack([p["image"] for p in expected["train"]]).astype(np.float64)
    meta = builder.info.metadata
    np.testing.assert_allclose(meta["channel_mean"], train.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(meta["channel_std"], train.std(axis=(0, 1, 2)), rtol=1e-9)
    assert len(meta["channel_names"]) == num_channels and meta["source_dtype"] == np.dtype(dtype).name


def shard_bytes(data_dir: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.glob("gerne_patches-*"))}


# ---------------------------------------------------------------------------------------------------
# Level 0: three layouts, user tissue masks (TIFF and PNG at 1/4), stride != P, chunked bands
# ---------------------------------------------------------------------------------------------------
P0, S0 = 16, 12


@pytest.fixture(scope="module")
def level0(tmp_path_factory):
    root = tmp_path_factory.mktemp("level0")
    rng = np.random.default_rng(0)
    layouts = {"a": ("interleaved", dict(compression="zlib"), (101, 90)),
               "b": ("planar", dict(tile=(32, 32)), (77, 120)),
               "c": ("per_channel", dict(), (96, 64))}
    splits = {"a": "train", "b": "validation", "c": "test"}
    rows, truth = [], {}
    for slide_id, (layout, options, shape) in layouts.items():
        image, tumour, tissue_low = make_slide(rng, shape, 4, np.uint16)
        files = write_layout(root / slide_id, image, layout, **options)
        mask = write_mask(root / f"{slide_id}_tumour.tif", tumour)
        tissue_file = write_mask(root / f"{slide_id}_tissue.{'png' if slide_id == 'b' else 'tif'}", tissue_low)
        row = {"slide_id": slide_id, "mask": mask.name, "tissue_mask": tissue_file.name,
               "patient_id": f"p{slide_id}", "split": splits[slide_id]}
        if len(files) == 1:
            row["image"] = files[0].name
        else:
            row["channels"] = ";".join(str(f.relative_to(root)) for f in files)
        rows.append(row)
        truth[slide_id] = brute_force(slide_id, f"p{slide_id}", image, tumour, upsample(tissue_low, 4, shape),
                                      P0, S0)
    manifest = write_manifest(root / "manifest.csv", rows)
    expected = {split: truth[s] for s, split in splits.items()}
    return root, manifest, expected


@pytest.fixture(scope="module")
def level0_tiled(level0):
    root, manifest, expected = level0
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scan, "BAND_BYTES", 40 * 16 * 4 * 2)  # 40 columns: several chunks per band
        assert main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
                     "--stride", str(S0), "--tissue-factor", "4"]) == 0
    return out


def test_level0_layouts_match_brute_force(level0, level0_tiled):
    _, _, expected = level0
    assert all(expected.values())
    check_dataset(level0_tiled, expected, 4, np.uint16)
    meta = dataset.read_metadata(level0_tiled)
    assert (meta["patch_size"], meta["stride"], meta["level"], meta["level_downsample"]) == (P0, S0, 0, 1)
    assert (meta["min_tumour_pixels"], meta["min_tissue_ratio"]) == (1, 0.0)
    for slide_id in "abc":
        with Image.open(level0_tiled / "qc" / f"{slide_id}.png") as png:
            assert png.format == "PNG" and min(png.size) > 100
    report = json.loads((level0_tiled / "tiling_report.json").read_text())
    assert {s: r["patches"] for s, r in report["slides"].items()} == {
        s: len(expected[split]) for s, split in zip("abc", ("train", "validation", "test"))}


def test_workers_and_reruns_give_byte_identical_shards(level0, level0_tiled, tmp_path):
    _, manifest, _ = level0
    out = tmp_path / "two_workers"
    assert main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
                 "--stride", str(S0), "--tissue-factor", "4", "--workers", "2"]) == 0
    reference = shard_bytes(level0_tiled)
    assert len(reference) == 3 and shard_bytes(out) == reference
    assert (out / "patches.csv").read_bytes() == (level0_tiled / "patches.csv").read_bytes()
    # A re-run resumes every slide and republishes the same bytes.
    assert main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
                 "--stride", str(S0), "--tissue-factor", "4"]) == 0
    assert shard_bytes(out) == reference
    report = json.loads((out / "tiling_report.json").read_text())
    assert {r["status"] for r in report["slides"].values()} == {"resumed"}


KILLER = textwrap.dedent("""
    import os, sys
    from data_pipeline import shards
    from data_pipeline.__main__ import main
    limit, calls = int(os.environ["KILL_AFTER_RECORDS"]), [0]
    serialize = shards.PatchSerializer.__call__
    def dying(self, example):
        calls[0] += 1
        if calls[0] > limit:
            os._exit(3)  # like a kill: no clean-up runs
        return serialize(self, example)
    shards.PatchSerializer.__call__ = dying
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_kill_mid_slide(level0, level0_tiled, tmp_path):
    _, manifest, expected = level0
    out = tmp_path / "killed"
    args = ["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
            "--stride", str(S0), "--tissue-factor", "4"]
    kill_after = len(expected["train"]) + len(expected["validation"]) // 2  # inside slide b
    env = dict(os.environ, KILL_AFTER_RECORDS=str(kill_after), PYTHONPATH=str(REPO))
    completed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, cwd=REPO,
                               capture_output=True, text=True)
    assert completed.returncode == 3, completed.stderr[-2000:]
    work = out / ".work"
    assert (work / "a.json").exists() and not (work / "b.json").exists()
    assert list(work.glob("b.array_record.tmp-*")), "the killed slide left its temporary file"
    assert not (out / "dataset_info.json").exists()

    assert main(args) == 0
    assert not list(work.glob("*.tmp-*"))
    assert shard_bytes(out) == shard_bytes(level0_tiled)
    assert (out / "patches.csv").read_bytes() == (level0_tiled / "patches.csv").read_bytes()
    report = json.loads((out / "tiling_report.json").read_text())
    assert [report["slides"][s]["status"] for s in "abc"] == ["resumed", "tiled", "tiled"]


def test_changed_settings_retile_instead_of_resuming(level0, level0_tiled, tmp_path):
    _, manifest, expected = level0
    out = tmp_path / "retile"
    base = ["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
            "--tissue-factor", "4"]
    assert main(base + ["--stride", str(P0)]) == 0
    assert main(base + ["--stride", str(S0)]) == 0
    report = json.loads((out / "tiling_report.json").read_text())
    assert {r["status"] for r in report["slides"].values()} == {"tiled"}
    assert shard_bytes(out) == shard_bytes(level0_tiled)


# ---------------------------------------------------------------------------------------------------
# Level 1 of pyramids, detected tissue, thresholds
# ---------------------------------------------------------------------------------------------------
def test_pyramid_level1_with_detected_tissue(tmp_path):
    rng = np.random.default_rng(1)
    P, S, f = 8, 6, 2
    rows, expected = [], {"train": [], "test": []}
    for slide_id, layout, split in (("p1", "ome_pyramid", "train"), ("p2", "subifd_pyramid", "test")):
        image, tumour, _ = make_slide(rng, (83, 70), 3, np.uint8)
        files = write_layout(tmp_path / slide_id, image, layout, tile=(16, 16), levels=2)
        mask = write_mask(tmp_path / f"{slide_id}_tumour.tif", tumour)
        rows.append({"slide_id": slide_id, "image": files[0].name, "mask": mask.name, "split": split})
        spec = SlideSpec(slide_id, tuple(files), mask)
        with SlideReader(spec, level=1) as reader:  # the tiler's own detection (docs/design.md §2)
            detected = detect_tissue(reader.thumbnail(f))
        level1, tumour1 = pyramid_levels(image, 2)[1], tumour[::2, ::2]
        expected[split] = brute_force(slide_id, "", level1, tumour1, upsample(detected, f, tumour1.shape),
                                      P, S, d=2, min_tumour_pixels=3, min_tissue_ratio=0.25)
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="split 'validation' has no patches"):
        assert main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P),
                     "--stride", str(S), "--level", "1", "--tissue-factor", str(f), "--min-tumour-pixels", "3",
                     "--min-tissue-ratio", "0.25"]) == 0
    assert all(expected.values())
    check_dataset(out, expected, 3, np.uint8)
    meta = dataset.read_metadata(out)
    assert (meta["level"], meta["level_downsample"], meta["min_tumour_pixels"], meta["min_tissue_ratio"]) == (
        1, 2, 3, 0.25)


@pytest.mark.filterwarnings("ignore:split '(validation|test)' has no patches")
def test_label_map_mask_with_tumour_ids(tmp_path):
    rng = np.random.default_rng(2)
    image, tumour, tissue_low = make_slide(rng, (48, 48), 2, np.float32)
    labels = np.where(tumour, 5, np.where(blobs(rng, (48, 48), 5, 0.3), 2, 0)).astype(np.uint8)
    write_layout(tmp_path / "s", image, "interleaved")
    tifffile.imwrite(tmp_path / "s_labels.tif", labels)
    write_mask(tmp_path / "s_tissue.tif", tissue_low)
    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "s", "image": "s.tif", "mask": "s_labels.tif",
                                                    "tissue_mask": "s_tissue.tif", "split": "train"}])
    out = tmp_path / "out"
    assert main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", "8",
                 "--tissue-factor", "4", "--tumour-ids", "5"]) == 0
    expected = brute_force("s", "", image, labels == 5, upsample(tissue_low, 4, (48, 48)), 8, 8)
    check_dataset(out, {"train": expected}, 2, np.float32)


def test_slides_without_patches_are_reported_and_left_out(tmp_path):
    rng = np.random.default_rng(5)
    image, tumour, tissue_low = make_slide(rng, (40, 40), 2, np.uint8)
    rows = []
    for slide_id, shape, empty in (("good", (40, 40), False), ("tiny", (12, 40), False), ("bare", (40, 40), True)):
        write_layout(tmp_path / slide_id, image[:shape[0]], "interleaved")
        write_mask(tmp_path / f"{slide_id}_t.tif", tumour[:shape[0]] & (not empty))
        write_mask(tmp_path / f"{slide_id}_m.tif", tissue_low[:-(-shape[0] // 4)] & (not empty))
        rows.append({"slide_id": slide_id, "image": f"{slide_id}.tif", "mask": f"{slide_id}_t.tif",
                     "tissue_mask": f"{slide_id}_m.tif", "split": "train"})
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as caught:
        assert main(["tile", "--manifest", str(write_manifest(tmp_path / "m.csv", rows)), "--out", str(out),
                     "--patch-size", "16", "--tissue-factor", "4"]) == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "slide 'tiny': no patch kept (12 x 40 pixels" in messages and "slide 'bare': no patch kept" in messages
    report = json.loads((out / "tiling_report.json").read_text())
    assert {s: r["patches"] for s, r in report["slides"].items()} == {
        "good": len(brute_force("good", "", image, tumour, upsample(tissue_low, 4, (40, 40)), 16, 16)),
        "tiny": 0, "bare": 0}
    assert {r["slide_id"] for r in read_csv_rows(out)} == {"good"}
    assert len(list(out.glob("gerne_patches-train.array_record-*"))) == 1


# ---------------------------------------------------------------------------------------------------
# Bad input through the CLI
# ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def bad_inputs(level0, tmp_path):
    """The level-0 manifest plus broken slides: truncated TIFF, label-map mask, wrong channel count."""
    root, manifest, _ = level0
    rows = list(csv.DictReader(open(manifest)))
    for row in rows:
        for key in ("image", "mask", "tissue_mask"):
            if row[key]:
                row[key] = str(root / row[key])
        if row["channels"]:
            row["channels"] = ";".join(str(root / c) for c in row["channels"].split(";"))
    data = (root / "a.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    labels = np.zeros((101, 90), np.uint8)
    labels[10:20, 10:20], labels[40:50, 40:50] = 3, 7
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((101, 90, 3), np.uint16) + np.arange(3, dtype=np.uint16))
    tifffile.imwrite(tmp_path / "small_mask.tif", np.zeros((50, 31), np.uint8))  # no integer fraction of (101, 90)
    write_layout(tmp_path / "constant", np.full((101, 90, 4), 7, np.uint16), "interleaved")
    broken = {"truncated": dict(rows[0], slide_id="truncated", image=str(tmp_path / "truncated.tif")),
              "wrong_mask": dict(rows[0], slide_id="wrong_mask", mask=str(tmp_path / "small_mask.tif")),
              "constant": dict(rows[0], slide_id="constant", image=str(tmp_path / "constant.tif")),
              "labelmap": dict(rows[0], slide_id="labelmap", mask=str(tmp_path / "labels.tif")),
              "three_channels": dict(rows[0], slide_id="three_channels", image=str(tmp_path / "rgb.tif"))}
    return rows, broken


@pytest.mark.parametrize("bad, message, workers", [
    ("truncated", "slide 'truncated', file '.*truncated.tif': .*truncated", 1),
    ("labelmap", "slide 'labelmap', file '.*labels.tif': mask is a label map", 1),
    ("labelmap", "slide 'labelmap', file '.*labels.tif': mask is a label map", 2),
    ("three_channels", "slide 'three_channels', file '.*rgb.tif': does not match the dataset's format", 1),
    ("wrong_mask", r"slide 'wrong_mask', file '.*small_mask.tif': mask shape \(50, 31\) does not match", 1),
    ("constant", "slide 'constant', file '.*constant.tif': empty slide: every pixel is 7", 1),
])
def test_bad_slide_stops_the_run_and_writes_nothing_of_it(bad_inputs, tmp_path, capsys, bad, message, workers):
    rows, broken = bad_inputs
    manifest = write_manifest(tmp_path / "m.csv", rows[:1] + [broken[bad]] + rows[1:])
    out = tmp_path / "out"
    with pytest.raises(SlideError) as raised:
        main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
              "--tissue-factor", "4", "--workers", str(workers)])
    assert re.search(message, str(raised.value))
    assert not list(out.rglob(f"{bad}*")), "nothing of the bad slide may be written"
    assert not (out / "dataset_info.json").exists()
    report = json.loads((out / "tiling_report.json").read_text())
    assert report["slides"][bad]["status"] == "failed"


def test_skip_errors_finishes_the_others_and_reports(bad_inputs, level0, tmp_path, capsys):
    rows, broken = bad_inputs
    _, _, expected = level0
    manifest = write_manifest(tmp_path / "m.csv", rows + list(broken.values()))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{len(broken)} of {len(rows) + len(broken)} slide"):
        main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", str(P0),
              "--stride", str(S0), "--tissue-factor", "4", "--skip-errors"])
    err = capsys.readouterr().err
    assert f"{len(broken)} slide(s) failed" in err and all(f"slide '{name}'" in err for name in broken)
    report = json.loads((out / "tiling_report.json").read_text())
    assert {s: r["status"] for s, r in report["slides"].items()} == {
        "a": "tiled", "b": "tiled", "c": "tiled", **{name: "failed" for name in broken}}
    assert "label map" in report["slides"]["labelmap"]["error"]
    assert {r["slide_id"] for r in read_csv_rows(out)} == {"a", "b", "c"}
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["a.png", "b.png", "c.png"]
    check_dataset(out, expected, 4, np.uint16)


def test_every_slide_failing_exits_non_zero(bad_inputs, tmp_path):
    _, broken = bad_inputs
    manifest = write_manifest(tmp_path / "m.csv", [broken["truncated"]])
    with pytest.raises(InputError, match="every slide .* failed"):
        main(["tile", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--patch-size", "16",
              "--skip-errors"])


def test_manifest_errors_are_named(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [{"slide_id": "x", "image": "missing.tif", "mask": "m.tif"}])
    with pytest.raises(SlideError, match="slide 'x'"):
        main(["tile", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--patch-size", "8"])
    tifffile.imwrite(tmp_path / "i.tif", np.zeros((8, 8), np.uint8))
    bad_id = write_manifest(tmp_path / "n.csv", [{"slide_id": "../x", "image": "i.tif", "mask": "i.tif"}])
    with pytest.raises(SlideError, match="slide_id is used as a file name"):
        main(["tile", "--manifest", str(bad_id), "--out", str(tmp_path / "o"), "--patch-size", "8"])
    assert not (tmp_path / "o").exists(), "a bad manifest leaves no output folder"


# ---------------------------------------------------------------------------------------------------
# QC masks and thumbnails; the CLI's flags
# ---------------------------------------------------------------------------------------------------
def test_qc_rows_collect_every_fth_pixel_of_the_scanned_area():
    rng = np.random.default_rng(4)
    tumour, tissue = rng.random((70, 53)) < 0.5, rng.random((70, 53)) < 0.5
    P, S, f = 8, 6, 3
    qc_tumour, qc_tissue = np.zeros((24, 18), bool), np.zeros((24, 18), bool)
    for ys, xs in scan_plan(tumour.shape, P, S, 1, 20 * P):
        y0, x0, h, w = ys[0], xs[0], ys[-1] + P - ys[0], xs[-1] + P - xs[0]
        scan.record_qc_rows(qc_tissue, qc_tumour, tissue[y0:y0 + h, x0:x0 + w],
                             tumour[y0:y0 + h, x0:x0 + w], y0, x0, f)
    covered_rows, covered_cols = (70 - P) // S * S + P, (53 - P) // S * S + P  # 68, 50
    np.testing.assert_array_equal(qc_tumour[:23, :17], tumour[:covered_rows:f, :covered_cols:f])
    np.testing.assert_array_equal(qc_tissue[:23, :17], tissue[:covered_rows:f, :covered_cols:f])
    assert not qc_tumour[23:].any() and not qc_tumour[:, 17:].any()


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
def test_qc_composite_gives_every_channel_a_colour(channels):
    thumbnail = np.zeros((4, channels * 4 + 4, channels), np.float32)  # last 4 columns: background
    for c in range(channels):
        thumbnail[:, 4 * c:4 * c + 4, c] = 100.0
    rgb = qc.composite_rgb(thumbnail)
    assert rgb.shape == (4, channels * 4 + 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert tuple(rgb[0, -1]) == (0, 0, 0)
    lit = [tuple(rgb[0, 4 * c]) for c in range(channels)]
    assert all(max(colour) == 1.0 for colour in lit) and len(set(lit)) == channels
    if channels == 3:
        assert lit == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]

def test_the_first_versions_flag_spelling_still_works():
    required = ["--manifest", "m.csv", "--out", "o", "--patch-size", "8"]
    for flag in ("--min-tumour-pixels", "--min-tumor-pixels"):
        assert commands.parse_args("tile", required + [flag, "4"]).min_tumour_pixels == 4


def test_scan_decodes_only_the_pixels_of_kept_patches(tmp_path):
    """Two tissue islands far apart in the rows of a TIFF in 16-pixel tiles: every kept patch has the
    file's pixels, and the tiles between the islands are never read."""
    P, height, width = 16, 32, 256
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(16, 16), photometric="rgb")
    tissue_low = np.zeros((height // 4, width // 4), bool)
    tissue_low[:, 1:7] = tissue_low[:, 50:53] = True  # level-0 columns 4-28 and 200-212
    write_mask(tmp_path / "tissue.tif", tissue_low)
    write_mask(tmp_path / "tumour.tif", np.zeros((height, width), bool))
    manifest = write_manifest(tmp_path / "manifest.csv", [{"slide_id": "s", "image": "slide.tif", "mask": "tumour.tif",
                                                            "tissue_mask": "tissue.tif", "split": "train"}])
    (spec,) = read_manifest(manifest)
    with SlideReader(spec) as reader:
        slide_scan = scan.SlideScan(reader, scan.TilingConfig(patch_size=P, stride=P, tissue_factor=4))
        bands = [band for block in slide_scan.blocks() for band in block.bands]
    # Each row: its two runs, read from their first to their last patch (the 10 tiles between the
    # islands are not read); the row's grid positions count once.
    assert [(band.y, band.x.tolist(), band.pixels.shape[1], band.positions) for band in bands] == [
        (0, [0, 16], 32, 16), (0, [192, 208], 32, 0), (16, [0, 16], 32, 16), (16, [192, 208], 32, 0)]
    for band in bands:
        for i, x in enumerate(band.x.tolist()):
            np.testing.assert_array_equal(band.patch(i), image[band.y:band.y + P, x:x + P])
