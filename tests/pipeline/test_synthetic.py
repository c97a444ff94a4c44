"""Synthetic slides: noise and shape primitives vs brute force, files vs geometry, determinism, CLI,
and the tissue-amount shortcut measured through the real tiler (`python -m data_pipeline tile`)."""
from __future__ import annotations

import csv
import hashlib
import math
import pathlib

import numpy as np
import pytest
import tifffile

from data_pipeline.__main__ import main
from data_pipeline.synthetic import layouts, noise, rendering, writing
from gerne_jax.core.errors import InputError

MANIFEST_COLUMNS = ["slide_id", "image", "mask", "patient_id", "split", "channel_names"]


def smoothstep(t: float) -> float:
    return t * t * (3 - 2 * t)


def lattice_value(key: int, i: int, j: int) -> float:
    return 2.0 * float(noise._hash_uniform(key, np.array([i]), np.array([j]))[0]) - 1.0


def test_value_noise_matches_pointwise_interpolation():
    rng = np.random.default_rng(0)
    key = 12345
    u = rng.uniform(-50, 50, 40)
    v = rng.uniform(-50, 50, 40)
    got = noise.value_noise(key, u, v)
    for k in range(len(u)):
        i, j = math.floor(u[k]), math.floor(v[k])
        su, sv = smoothstep(u[k] - i), smoothstep(v[k] - j)
        top = lattice_value(key, i, j) * (1 - sv) + lattice_value(key, i, j + 1) * sv
        bottom = lattice_value(key, i + 1, j) * (1 - sv) + lattice_value(key, i + 1, j + 1) * sv
        assert got[k] == pytest.approx(top * (1 - su) + bottom * su, abs=1e-5)
    assert np.all(np.abs(got) <= 1.0)


def test_value_noise_separable_path_and_windows_agree():
    y = np.arange(-37, 90, dtype=np.float32)[:, None] / 7.3
    x = np.arange(500, 620, dtype=np.float32)[None, :] / 7.3
    separable = noise.value_noise(7, y, x)
    general = noise.value_noise(7, np.broadcast_to(y, separable.shape), np.broadcast_to(x, separable.shape))
    np.testing.assert_array_equal(separable, general)
    # A sub-window evaluated alone gives the same values (tiles join without seams).
    np.testing.assert_array_equal(noise.value_noise(7, y[20:50], x[:, 33:70]), separable[20:50, 33:70])


def test_nuclei_match_brute_force_over_cells():
    key, cell, density, radius = 99, 7.0, 0.6, 2.5
    y = np.arange(100, 140, dtype=np.float32)[:, None]
    x = np.arange(-20, 25, dtype=np.float32)[None, :]
    got = noise.nuclei(key, y, x, cell, density, radius)
    expected = np.zeros(got.shape)
    yy, xx = np.broadcast_arrays(y.astype(np.float64), x.astype(np.float64))
    for ci in range(int(100 // cell) - 2, int(140 // cell) + 3):
        for cj in range(int(-20 // cell) - 2, int(25 // cell) + 3):
            h = [float(noise._hash_uniform(key, np.array([4 * ci + n]), np.array([cj]))[0]) for n in range(4)]
            if h[2] >= density:
                continue
            support = min(2 * radius * (0.7 + 0.6 * h[3]), cell)
            d2 = (yy - (ci + h[0]) * cell) ** 2 + (xx - (cj + h[1]) * cell) ** 2
            expected = np.maximum(expected, np.clip(1 - d2 / support ** 2, 0, None) ** 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.max() > 0.9  # some nuclei do fall in the window


def test_shape_level_matches_polar_formula():
    shape = layouts.Shape(centre=(40.0, -10.0), axes=(30.0, 12.0), angle=0.7,
                            lobe_amplitudes=(0.1, 0.05, 0.08, 0.02, 0.04),
                            lobe_phases=(0.3, 2.0, 4.0, 1.0, 5.5))
    y, x = np.mgrid[-10:90, -60:40].astype(np.float32)
    along = ((x + 10) * math.cos(0.7) + (y - 40) * math.sin(0.7)) / 30
    across = ((y - 40) * math.cos(0.7) - (x + 10) * math.sin(0.7)) / 12
    theta = np.arctan2(across, along)
    outline = 1 + sum(a * np.cos(k * theta + p) for k, a, p in
                      zip(layouts.HARMONICS, shape.lobe_amplitudes, shape.lobe_phases))
    expected = 1 - np.hypot(along, across) / outline
    np.testing.assert_allclose(shape.level(y, x), expected, atol=1e-5)
    # The bounding box really bounds the shape.
    inside = np.argwhere(expected > 0)
    ey, ex = shape.extent
    assert np.all(np.abs(y[tuple(inside.T)] - 40) <= ey) and np.all(np.abs(x[tuple(inside.T)] + 10) <= ex)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_geometry_of_a_window_is_independent_of_tiling(layout):
    layout = layouts.sample_layout(seed=3, slide_index=1, nominal_size=1024, layout=layout)
    whole = rendering.render_geometry(layout, 100, 200, 600, 500)
    assert whole.tissue.any() and whole.tumour.any()
    assert not np.any(whole.tumour & ~whole.tissue)
    assert np.all(whole.kind[whole.tumour] == len(layout.textures) - 1)
    for y0, x0, h, w in [(100, 200, 256, 256), (333, 457, 170, 211), (650, 600, 50, 100)]:
        part = rendering.render_geometry(layout, y0, x0, h, w)
        window = (slice(y0 - 100, y0 - 100 + h), slice(x0 - 200, x0 - 200 + w))
        for name in ("tissue", "tumour", "kind"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[window])


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_box_culling_matches_evaluating_every_body(layout):
    # A large slide (with the coarse warp octaves): evaluate every body over the whole window.
    layout = layouts.sample_layout(seed=2, slide_index=0, nominal_size=3200, layout=layout)
    assert len(layout.warp) > len(layouts.WARP_OCTAVES)
    big = max(layout.bodies, key=lambda body: body.shape.axes[0])
    y0, x0 = (int(c) - 100 for c in big.shape.centre)
    y0 += int(big.shape.extent[0])  # straddle the body's lower edge
    geometry = rendering.render_geometry(layout, y0, x0, 200, 200)
    y = np.arange(y0, y0 + 200, dtype=np.float32)[:, None]
    x = np.arange(x0, x0 + 200, dtype=np.float32)[None, :]
    warped_y, warped_x = rendering._warped_coordinates(layout, y, x)
    tissue = np.zeros((200, 200), bool)
    tumour = np.zeros((200, 200), bool)
    kind = np.zeros((200, 200), int)
    for body in layout.bodies:
        inside = body.shape.level(warped_y, warped_x) > 0
        tissue |= inside
        kind[inside] = body.base_kind  # later bodies and regions on top
        for region, region_kind in body.regions:
            kind[inside & (region.level(warped_y, warped_x) > 0)] = region_kind
        for region in body.tumours:
            tumour |= inside & (region.level(warped_y, warped_x) > 0)
    kind[tumour] = len(layout.textures) - 1
    assert 0 < tissue.mean() < 1
    np.testing.assert_array_equal(geometry.tissue, tissue)
    np.testing.assert_array_equal(geometry.tumour, tumour)
    np.testing.assert_array_equal(geometry.kind[tissue], kind[tissue])


def read_manifest_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic")
    writing.generate(out, num_slides=3, size=600, seed=5, write_tissue_masks=True, show_progress=False)
    return out


def test_files_follow_the_manifest_format_and_geometry(small_set):
    rows = read_manifest_rows(small_set / "manifest.csv")
    with open(small_set / "manifest.csv") as f:
        assert f.readline().strip().split(",") == MANIFEST_COLUMNS[:3] + ["tissue_mask"] + MANIFEST_COLUMNS[3:]
    assert [r["slide_id"] for r in rows] == ["slide_000", "slide_001", "slide_002"]
    assert sorted(r["split"] for r in rows) == ["test", "train", "validation"]
    assert len({r["patient_id"] for r in rows}) == 3
    for index, row in enumerate(rows):
        assert row["channel_names"] == "CARS;TPEF;SHG"
        for column in ("image", "mask", "tissue_mask"):
            assert not pathlib.Path(row[column]).is_absolute()
        with tifffile.TiffFile(small_set / row["image"]) as tif:
            page = tif.pages[0]
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (writing.TILE, writing.TILE)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert tif.shaped_metadata[0]["channel_names"] == ["CARS", "TPEF", "SHG"]
            image = tif.asarray()
        tumour = tifffile.imread(small_set / row["mask"])
        tissue = tifffile.imread(small_set / row["tissue_mask"])
        height, width = image.shape[:2]
        assert image.dtype == np.uint16 and image.shape[2] == 3
        assert 0.92 * 600 - 1 <= height <= 600 and 0.92 * 600 - 1 <= width <= 600
        assert tumour.dtype == np.uint8 and tumour.shape == (height, width)
        assert set(np.unique(tumour)) <= {0, 1} and set(np.unique(tissue)) <= {0, 1}
        # Masks in the files equal the geometry rendered as one window (no tiling involved).
        layout = layouts.sample_layout(5, index, 600)
        geometry = rendering.render_geometry(layout, 0, 0, height, width)
        np.testing.assert_array_equal(tumour.astype(bool), geometry.tumour)
        np.testing.assert_array_equal(tissue.astype(bool), geometry.tissue)
        # Dark background, bright tissue, in every tile (including partial edge tiles).
        background = image[~geometry.tissue].astype(float).mean(axis=0)
        foreground = image[geometry.tissue].astype(float).mean(axis=0)
        assert np.all(foreground[:2] > 4 * background[:2])


def test_tumour_signature_channel_ratio_and_collagen(small_set):
    tumour_means, normal_means = [], []
    for row in read_manifest_rows(small_set / "manifest.csv"):
        image = tifffile.imread(small_set / row["image"]).astype(np.float64)
        tumour = tifffile.imread(small_set / row["mask"]).astype(bool)
        normal = tifffile.imread(small_set / row["tissue_mask"]).astype(bool) & ~tumour
        if tumour.sum() > 1000 and normal.sum() > 1000:
            tumour_means.append(image[tumour].mean(axis=0))
            normal_means.append(image[normal].mean(axis=0))
    assert tumour_means, "no slide with both tumour and normal tissue"
    tumour_mean, normal_mean = np.mean(tumour_means, axis=0), np.mean(normal_means, axis=0)
    ratio_shift = (tumour_mean[1] / tumour_mean[0]) / (normal_mean[1] / normal_mean[0])
    assert 1.10 <= ratio_shift <= 1.35  # TPEF/CARS higher in tumour, a modest shift
    assert normal_mean[2] > 1.5 * tumour_mean[2]  # SHG collagen mostly in normal stroma


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_same_arguments_give_identical_bytes(tmp_path, layout):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        writing.generate(tmp_path / name, num_slides=2, size=300, seed=seed, show_progress=False,
                           layout=layout)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["manifest.csv", "slide_000.tif", "slide_000_tumour.tif", "slide_001.tif",
                     "slide_001_tumour.tif"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "slide_000.tif").read_bytes() != (tmp_path / "c" / "slide_000.tif").read_bytes()


# SHA-256 (first 16 hex digits) of the decoded pixels of every file (the manifest's bytes) that the
# first generator, before `--layout` existed, wrote for these arguments. Pixels rather than file
# bytes, so that another zlib build (same pixels, other deflate stream) does not fail the test.
CLASSIC_OUTPUT = {
    (7, 2, 300): {"manifest.csv": "e85ca8a7c459dbb5", "slide_000.tif": "9c73f7cb6aff8f48",
                  "slide_000_tumour.tif": "4c0273d8f2efd770", "slide_001.tif": "a88b2ccb3c91c0ec",
                  "slide_001_tumour.tif": "4dc1861f2f6a1c81"},
    (0, 3, 600): {"manifest.csv": "401a6f636d977201", "slide_000.tif": "1f0bca0a30d1e9c6",
                  "slide_000_tumour.tif": "ea588550ba23daac", "slide_001.tif": "8d147218f8f19e69",
                  "slide_001_tumour.tif": "71ab04940d1e492f", "slide_002.tif": "a91a77e411a18dec",
                  "slide_002_tumour.tif": "84d317f366293090"},
}


@pytest.mark.parametrize("seed, num_slides, size", sorted(CLASSIC_OUTPUT))
def test_classic_layout_is_the_first_generator(tmp_path, seed, num_slides, size):
    for name, kwargs in (("default", {}), ("classic", {"layout": "classic"})):
        writing.generate(tmp_path / name, num_slides, size, seed, show_progress=False, **kwargs)
        digests = {}
        for path in sorted((tmp_path / name).iterdir()):
            data = path.read_bytes() if path.suffix == ".csv" else tifffile.imread(path).tobytes()
            digests[path.name] = hashlib.sha256(data).hexdigest()[:16]
        assert digests == CLASSIC_OUTPUT[seed, num_slides, size], name


@pytest.mark.parametrize("num_slides", range(1, 21))
def test_splits_by_slide(num_slides):
    splits = writing.assign_splits(num_slides, seed=0)
    assert splits == writing.assign_splits(num_slides, seed=0)
    counts = {name: splits.count(name) for name in ("train", "validation", "test")}
    assert sum(counts.values()) == num_slides
    assert counts["train"] >= max(counts["validation"], counts["test"])
    if num_slides >= 3:
        assert min(counts.values()) >= 1
    if num_slides >= 10:
        for name, fraction in writing.SPLIT_FRACTIONS:
            assert abs(counts[name] - fraction * num_slides) <= 1


def test_cli(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "out"), "--slides", "3", "--size", "256",
                 "--seed", "4"]) == 0
    rows = read_manifest_rows(tmp_path / "out" / "manifest.csv")
    assert list(rows[0]) == MANIFEST_COLUMNS and len(rows) == 3
    assert main(["synthetic", "--out", str(tmp_path / "sections"), "--slides", "3", "--size", "256",
                 "--seed", "4", "--layout", "sections"]) == 0
    assert "3 sections synthetic slides" in capsys.readouterr().out
    image = tmp_path / "sections" / "slide_000.tif"
    assert image.read_bytes() != (tmp_path / "out" / "slide_000.tif").read_bytes()
    for bad in (["--size", "100"], ["--slides", "0"], ["--layout", "squares"]):
        with pytest.raises(SystemExit):
            main(["synthetic", "--out", str(tmp_path / "bad")] + bad)
        assert bad[0] in capsys.readouterr().err
    with pytest.raises(InputError, match="--layout.*'squares'"):
        writing.generate(tmp_path / "bad", 1, 256, layout="squares", show_progress=False)
    assert not (tmp_path / "bad").exists()


def group_shares(patches_csv: pathlib.Path, tau: float) -> tuple[float, float]:
    """Shares of (tumour, tissue_ratio < tau) and (non-tumour, tissue_ratio >= tau) among all patches."""
    ratio, label = read_patches(patches_csv)
    return float(np.mean((label == 1) & (ratio < tau))), float(np.mean((label == 0) & (ratio >= tau)))


def read_patches(patches_csv: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    rows = read_manifest_rows(patches_csv)
    return (np.array([float(r["tissue_ratio"]) for r in rows]), np.array([int(r["label"]) for r in rows]))


# The demo setting: slides of 2048 pixels a side tiled at 64 (and 32) with the real tiler and its tissue
# detection. All splits are pooled (splits are random by slide, so each has the same distribution).
SHORTCUT_SIZE, SHORTCUT_SLIDES = 2048, 3


@pytest.mark.parametrize("seed, patch_sizes", [(0, (64, 32)), (1, (64,)), (2, (64,))])
def test_shortcut_through_the_tiler(tmp_path, seed, patch_sizes):
    manifest = writing.generate(tmp_path / "slides", SHORTCUT_SLIDES, SHORTCUT_SIZE, seed, show_progress=False)
    for patch_size in patch_sizes:
        data_dir = tmp_path / f"data_{patch_size}"
        assert main(["tile", "--manifest", str(manifest), "--out", str(data_dir),
                     "--patch-size", str(patch_size)]) == 0
        ratio, label = read_patches(data_dir / "patches.csv")
        shares = {tau: group_shares(data_dir / "patches.csv", tau) for tau in (0.03, 0.1, 0.2)}
        print(f"seed {seed} P{patch_size}: {len(label)} patches, tumour {label.mean():.1%}, median tissue "
              f"ratio tumour {np.median(ratio[label == 1]):.2f} non-tumour {np.median(ratio[label == 0]):.2f}; "
              + "; ".join(f"tau {tau}: (1, r<tau) {a:.1%} (0, r>=tau) {b:.1%}" for tau, (a, b) in shares.items()))
        # Tumour patches are mostly full of tissue, non-tumour patches mostly not...
        assert np.median(ratio[label == 1]) > 0.8
        assert np.median(ratio[label == 0]) < 0.5
        # ...and both minority groups exist but are small: at P=64 within 1-15% at tau = 0.1; at P=32
        # non-tumour patches on tissue strands more often reach 10%, so the bound is looser.
        upper = 0.15 if patch_size == 64 else 0.20
        tumour_little_tissue, normal_much_tissue = shares[0.1]
        assert 0.01 <= tumour_little_tissue <= upper
        assert 0.01 <= normal_much_tissue <= upper


def patches_of(a: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, ...) -> (patches, patch_size**2, ...): the whole patches of a grid with stride = size."""
    rows, cols = a.shape[0] // patch_size, a.shape[1] // patch_size
    a = a[:rows * patch_size, :cols * patch_size]
    a = a.reshape(rows, patch_size, cols, patch_size, *a.shape[2:]).swapaxes(1, 2)
    return a.reshape(rows * cols, patch_size * patch_size, *a.shape[4:])


def patch_statistics(slides: pathlib.Path, patch_size: int) -> dict[str, np.ndarray]:
    """Per patch of a `patch_size` grid, from the written TIFFs alone: the true tissue ratio, the label
    (any tumour pixel) and each channel's mean over the patch's tissue pixels; patches with tissue."""
    columns = {"ratio": [], "label": [], "mean": []}
    for row in read_manifest_rows(slides / "manifest.csv"):
        image = tifffile.imread(slides / row["image"]).astype(np.float64)
        tumour = tifffile.imread(slides / row["mask"]).astype(bool)
        tissue = tifffile.imread(slides / row["tissue_mask"]).astype(bool)
        weight = patches_of(tissue, patch_size).astype(np.float64)
        ratio = weight.mean(axis=1)
        keep = ratio > 0
        columns["ratio"].append(ratio[keep])
        columns["label"].append(patches_of(tumour, patch_size).any(axis=1)[keep])
        weight, pixels = weight[keep], patches_of(image, patch_size)[keep]
        columns["mean"].append(np.einsum("np,npc->nc", weight, pixels) / weight.sum(axis=1)[:, None])
    return {name: np.concatenate(parts) for name, parts in columns.items()}


@pytest.mark.slow
def test_sections_layout_has_full_non_tumour_tissue_with_a_subtler_texture(tmp_path):
    """The sections layout against the classic one on the same arguments (2048-pixel slides, P = 64):
    many non-tumour patches full of tissue, the shortcut kept, and a smaller but present contrast."""
    found = {}
    for layout in layouts.LAYOUTS:
        writing.generate(tmp_path / layout, 2, SHORTCUT_SIZE, seed=0, write_tissue_masks=True,
                           show_progress=False, layout=layout)
        found[layout] = patch_statistics(tmp_path / layout, 64)
    shares = {}
    for layout, stats in found.items():
        ratio, tumour = stats["ratio"], stats["label"]
        shares[layout] = float(np.mean(ratio[~tumour] >= 0.5))
        print(f"{layout}: {len(ratio)} patches, non-tumour with r >= 0.5 {shares[layout]:.1%}, "
              f"tumour with r >= 0.5 {np.mean(ratio[tumour] >= 0.5):.1%}")
    sections = found["sections"]
    ratio, tumour = sections["ratio"], sections["label"]
    # Non-tumour tissue in large regions: a substantial share of non-tumour patches is mostly tissue,
    # several times the classic layout's...
    assert shares["sections"] >= 0.10 and shares["sections"] >= 4 * shares["classic"]
    # ...while the shortcut stays: tumour patches mostly full of tissue, most non-tumour patches with
    # little, and both minority groups of tau = 0.1 present.
    assert np.median(ratio[tumour]) > 0.7 and np.mean(ratio[tumour] >= 0.5) > 0.6
    assert np.mean(ratio[~tumour] < 0.1) > 0.5
    assert np.mean(tumour & (ratio < 0.1)) >= 0.02 and np.mean(~tumour & (ratio >= 0.1)) >= 0.10
    # Texture of patches full of tissue: tumour has the higher TPEF/CARS ratio and less SHG collagen in
    # both layouts, but the non-tumour tissue of sections comes closer to it on both cues.
    gaps = {}
    for layout, stats in found.items():
        full = stats["ratio"] >= 0.9
        tpef_cars = stats["mean"][:, 1] / stats["mean"][:, 0]
        shg = stats["mean"][:, 2]
        tumour_full, normal_full = full & stats["label"], full & ~stats["label"]
        assert tumour_full.sum() >= 20 and normal_full.sum() >= 5, layout
        gaps[layout] = (np.median(tpef_cars[tumour_full]) / np.median(tpef_cars[normal_full]),
                        np.median(shg[normal_full]) / np.median(shg[tumour_full]))
    print("tumour / non-tumour TPEF/CARS, non-tumour / tumour SHG (full patches):", gaps)
    for cue in range(2):
        assert 1.03 < gaps["sections"][cue] < gaps["classic"][cue]
