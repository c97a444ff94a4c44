"""Bad input through the real command line: `python -m data_pipeline {tile,synthetic,stats}` in a subprocess.

Every known failure must end in one line `error: <what>, <where>` on stderr, exit status 2, no traceback,
and nothing half-made: no dataset_info.json / patches.csv when the run failed, and with --skip-errors
no trace of a broken slide in the published dataset. Slides are tiny tifffile-written arrays, so each
run costs about the interpreter's start-up.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from data_pipeline import shards
from gerne_jax.data.dataset import DatasetError
from tests.helpers import REPO

RUN_TIMEOUT_S = 120
SIZE = 64  # slide side in pixels
PATCH = "16"


# ---------------------------------------------------------------------------------------------------
# Slides, manifests and the command line
# ---------------------------------------------------------------------------------------------------
def slide_arrays(seed: int, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """(image (64, 64, 3), tumour mask (64, 64) uint8): bright noisy tissue on the left half, dark
    noisy background on the right, a tumour square inside the tissue."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 30, (SIZE, SIZE, 3))
    image[:, : SIZE // 2] += 180
    tumour = np.zeros((SIZE, SIZE), np.uint8)
    tumour[8:24, 8:24] = 1
    return image.astype(dtype), tumour


def write_slide(folder: pathlib.Path, slide_id: str, image: np.ndarray, tumour: np.ndarray,
                tissue: np.ndarray | None = None, **tiff_options) -> dict[str, str]:
    """Writes the slide's files (image as RGB, 3 channels) into `folder`; returns its manifest row (paths
    relative to `folder`)."""
    tifffile.imwrite(folder / f"{slide_id}.tif", image, photometric="rgb", **tiff_options)
    tifffile.imwrite(folder / f"{slide_id}_tumour.tif", tumour)
    row = {"slide_id": slide_id, "image": f"{slide_id}.tif", "mask": f"{slide_id}_tumour.tif", "split": "train"}
    if tissue is not None:
        tifffile.imwrite(folder / f"{slide_id}_tissue.tif", tissue.astype(np.uint8))
        row["tissue_mask"] = f"{slide_id}_tissue.tif"
    return row


def write_manifest(folder: pathlib.Path, rows: list[dict[str, str]], name: str = "manifest.csv") -> pathlib.Path:
    path = folder / name
    columns = ["slide_id", "image", "mask", "tissue_mask", "split"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in columns} for row in rows)
    return path


def cli(*args: str | os.PathLike, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m data_pipeline ARGS` as a user runs it (a hang fails the test through the timeout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tile(manifest: pathlib.Path, out: pathlib.Path, *options: str) -> subprocess.CompletedProcess:
    return cli("tile", "--manifest", manifest, "--out", out, "--patch-size", PATCH, *options)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a run that failed on bad input (status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def assert_nothing_published(out: pathlib.Path) -> None:
    assert not (out / "dataset_info.json").exists() and not (out / "patches.csv").exists()
    assert not list(out.glob("gerne_patches-*"))


def published_slides(out: pathlib.Path) -> dict[str, int]:
    """Patches per slide in patches.csv."""
    with open(out / "patches.csv", newline="") as handle:
        slide_ids = [row["slide_id"] for row in csv.DictReader(handle)]
    return {slide_id: slide_ids.count(slide_id) for slide_id in sorted(set(slide_ids))}


# ---------------------------------------------------------------------------------------------------
# Options, manifests, datasets: one line and status 2 from every subcommand
# ---------------------------------------------------------------------------------------------------
def test_bad_options_and_missing_inputs_answer_with_one_line(tmp_path):
    good = write_manifest(tmp_path, [write_slide(tmp_path, "good", *slide_arrays(0))])
    missing = write_manifest(tmp_path, [{"slide_id": "lost", "image": "lost.tif", "mask": "lost_m.tif"}],
                             "missing.csv")
    out = tmp_path / "out"
    cases = [
        (tile(missing, out), ["slide 'lost'", "lost.tif", "file not found"]),
        (tile(tmp_path / "nowhere.csv", out), ["manifest", "nowhere.csv", "cannot open"]),
        (tile(good, out, "--min-tissue-ratio", "1.5"), ["--min-tissue-ratio", "1.5"]),
        (cli("stats", "--data-dir", tmp_path / "no_dataset"), ["no_dataset", "patches.csv is missing"]),
        (cli("synthetic", "--out", good, "--slides", "1", "--size", "256"), ["--out", "manifest.csv", "not a folder"]),
    ]
    for result, fragments in cases:
        line = error_line(result)
        assert all(fragment in line for fragment in fragments), (fragments, line)
    assert not out.exists(), "a run refused before tiling leaves no output folder"


def test_stats_tau_out_of_range_is_named(tmp_path):
    manifest = write_manifest(tmp_path, [write_slide(tmp_path, "good", *slide_arrays(0))])
    assert tile(manifest, tmp_path / "out").returncode == 0
    line = error_line(cli("stats", "--data-dir", tmp_path / "out", "--tau", "0.1", "2"))
    assert "--tau [2.0]" in line
    assert not (tmp_path / "out" / "tissue_ratio.png").exists()


# ---------------------------------------------------------------------------------------------------
# Slides that give no patch: a warning each, the others published
# ---------------------------------------------------------------------------------------------------
def test_thin_small_and_tissue_free_slides_give_zero_patches_with_a_warning(tmp_path):
    image, tumour = slide_arrays(1)
    rows = [write_slide(tmp_path, "good", image, tumour),
            write_slide(tmp_path, "one_pixel_wide", image[:, :1], tumour[:, :1]),
            write_slide(tmp_path, "one_pixel_high", image[:1], tumour[:1]),
            write_slide(tmp_path, "below_a_patch", image[:10, :12], tumour[:10, :12]),
            write_slide(tmp_path, "no_tissue", image, np.zeros_like(tumour), tissue=np.zeros((SIZE, SIZE)))]
    out = tmp_path / "out"
    result = tile(write_manifest(tmp_path, rows), out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for slide_id in ("one_pixel_wide", "one_pixel_high", "below_a_patch", "no_tissue"):
        assert f"slide '{slide_id}': no patch kept" in result.stderr
        assert (out / "qc" / f"{slide_id}.png").is_file()
    assert list(published_slides(out)) == ["good"]
    report = json.loads((out / "tiling_report.json").read_text())["slides"]
    assert report["one_pixel_wide"]["patches"] == report["no_tissue"]["patches"] == 0


# ---------------------------------------------------------------------------------------------------
# Non-finite pixels and channel statistics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, skip_errors", [(np.nan, False), (np.inf, True)])
def test_non_finite_pixels_stop_the_slide_naming_file_and_position(tmp_path, value, skip_errors):
    good, tumour = slide_arrays(2, np.float32)
    broken = good.copy()
    broken[37, 5, 1] = value
    broken[50, 60, 0] = value
    rows = [write_slide(tmp_path, "good", good, tumour), write_slide(tmp_path, "broken", broken, tumour)]
    out = tmp_path / "out"
    result = tile(write_manifest(tmp_path, rows), out, *(["--skip-errors"] if skip_errors else []))
    line = error_line(result)
    if skip_errors:
        assert "1 of 2 slide(s)" in line
        assert "slide 'broken'" in result.stderr and "y=37, x=5, channel 1" in result.stderr
        assert list(published_slides(out)) == ["good"]
        metadata = json.loads((out / "metadata.json").read_text())
        assert np.all(np.isfinite(metadata["channel_mean"])) and np.all(np.isfinite(metadata["channel_std"]))
    else:
        assert "slide 'broken', file '" in line and "broken.tif" in line
        assert f"non-finite pixel value {value}" in line and "y=37, x=5, channel 1" in line
        assert_nothing_published(out)
    assert not list(out.rglob("broken*")), "nothing of the broken slide may be written"


def test_non_finite_channel_statistics_are_never_published(tmp_path):
    patches = np.ones((4, 8, 8, 2), np.float32)
    patches[2, 3, 3, 1] = np.nan
    fields = {"image": patches, "label": np.array([0, 1, 0, 1]), "tumour_fraction": np.zeros(4),
              "tissue_ratio": np.ones(4), "slide_id": np.array(["s"] * 4), "patient_id": np.array(["p"] * 4),
              "x": np.arange(4) * 8, "y": np.zeros(4, np.int64)}
    with pytest.raises(DatasetError, match=r"split 'train', channel\(s\) \['SHG'\]: .*not finite"):
        shards.write_patch_dataset(tmp_path, {"train": fields}, channel_names=["CARS", "SHG"])
    assert_nothing_published(tmp_path)


# ---------------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from gerne_jax.core.files import exclusive_lock
    with exclusive_lock(sys.argv[1], "tiling"):
        print("holding", flush=True)
        time.sleep(120)
""")


def snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_stops_at_the_lock_and_a_killed_holder_is_taken_over(tmp_path):
    manifest = write_manifest(tmp_path, [write_slide(tmp_path, "good", *slide_arrays(3))])
    out = tmp_path / "out"
    assert tile(manifest, out).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = snapshot(out)
        line = error_line(tile(manifest, out, "--min-tissue-ratio", "0.5"))
        assert f"{out} is in use by pid {holder.pid} on host" in line and "(tiling)" in line
        assert snapshot(out) == before, "the refused run may touch nothing of the running one"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    result = tile(manifest, out, "--min-tissue-ratio", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "tiling_report.json").read_text())
    assert report["config"]["min_tissue_ratio"] == 0.5 and report["slides"]["good"]["status"] == "tiled"


# ---------------------------------------------------------------------------------------------------
# Fuzz: truncated slides and masks with flipped bytes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_truncated_slides_and_corrupt_masks_fail_cleanly_or_tile_whole(tmp_path):
    """Seeded corruptions of a valid slide: each broken copy either fails with a one-line SlideError
    or tiles whole; it is never published in part, and no run hangs or prints a traceback."""
    rng = np.random.default_rng(20240601)
    image, tumour = slide_arrays(4)
    rows = [write_slide(tmp_path, "good", image, tumour, tile=(16, 16), compression="zlib")]
    source = (tmp_path / "good.tif").read_bytes()
    mask = (tmp_path / "good_tumour.tif").read_bytes()
    for k, offset in enumerate(sorted(rng.choice(len(source), 20, replace=False).tolist())):
        (tmp_path / f"cut{k:02d}.tif").write_bytes(source[:offset])
        rows.append(dict(rows[0], slide_id=f"cut{k:02d}", image=f"cut{k:02d}.tif"))
    for k in range(20):  # even k: flips in the header and tags (the first 256 bytes), odd k: anywhere
        flipped = bytearray(mask)
        for position in rng.choice(256 if k % 2 == 0 else len(mask), 3, replace=False).tolist():
            flipped[position] ^= int(rng.integers(1, 256))
        (tmp_path / f"flip{k:02d}_tumour.tif").write_bytes(bytes(flipped))
        rows.append(dict(rows[0], slide_id=f"flip{k:02d}", mask=f"flip{k:02d}_tumour.tif"))
    out = tmp_path / "out"
    result = tile(write_manifest(tmp_path, rows), out, "--skip-errors")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    report = json.loads((out / "tiling_report.json").read_text())["slides"]
    failed = sorted(s for s, r in report.items() if r["status"] == "failed")
    assert "good" not in failed and any(s.startswith("cut") for s in failed), report
    if failed:
        assert f"{len(failed)} of {len(rows)} slide(s)" in error_line(result)
    published = published_slides(out)
    for slide_id, entry in report.items():
        if slide_id in failed:
            assert slide_id not in published and f"slide '{slide_id}'" in entry["error"]
            assert not (out / ".work" / f"{slide_id}.json").exists()
        else:  # tiled whole: every kept patch is in the dataset
            assert published.get(slide_id, 0) == entry["patches"], slide_id
    cut_intact = [s for s in report if s.startswith("cut") and s not in failed]
    assert all(report[s]["patches"] == report["good"]["patches"] for s in cut_intact)

    # Without --skip-errors the first broken copy of each kind stops the run and nothing is published.
    for kind in ("cut", "flip"):
        broken = next((row for row in rows if row["slide_id"] in failed and row["slide_id"].startswith(kind)), None)
        if broken is None:
            continue
        single = tmp_path / f"out_{kind}"
        line = error_line(tile(write_manifest(tmp_path, [rows[0], broken], f"{kind}.csv"), single))
        assert f"slide '{broken['slide_id']}', file '" in line
        assert_nothing_published(single)
