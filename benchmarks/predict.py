"""Whole-slide prediction throughput beside the jitted model alone, and the predictor's peak memory.

Uses `benchmarks/tiling.py`'s slide writer (tiled uint8 RGB TIFF with JPEG tiles and a SubIFD pyramid,
tiled tumour mask), kept in --work-dir for reruns. Set-up: a small slide of that kind is tiled into a
DATA_DIR and a run of `--model` (default the tiny ResNet) is trained on it for two steps (the weights do
not matter for speed). Then, in each of --rounds rounds (the round with the median ratio is printed):

  model     the jitted, sharded classifier (`inference.PatchClassifier`) alone on in-memory uint8
            patches, as many as the slide has, in batches of --batch-size
  predict   `gerne_jax.predict.prediction.predict_manifest` on the large slide, in this process after a
            warm-up on it (compilation excluded): reading, tissue detection, batching, the model,
            the map, overlay, regions and tables; the model alone runs before and after it and the
            two times are averaged (the machine's speed drifts within minutes; a linear drift cancels)
  (both also as CPU seconds of the process: on a machine shared with other jobs their ratio is the
  steadier figure)
  many      `predict_manifest` on --many-slides copies of a --many-size slide, beside the model alone
            on as many patches: the pipelining of slides (one opened and one written while one is scanned)
  memory    `predict.py` on the large slide in a fresh subprocess: its own peak RSS (`peak_rss.py`)
            and wall time including start-up

Target on CPU with the tiny model: predict >= 0.8 x model patches/s, and peak RSS < 2 GB on a
30,000 x 30,000 slide. On an accelerator, `--model resnet50`.

    .venv/bin/python benchmarks/predict.py                      # 30000 x 30000 (minutes)
    .venv/bin/python benchmarks/predict.py --size 8192          # quick
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.tile_manifest import tile_manifest  # noqa: E402
from gerne_jax.core import cli  # noqa: E402
from gerne_jax.methods import registry  # noqa: E402
from gerne_jax.predict import inference, prediction, run_data  # noqa: E402
from gerne_jax.slides.scan import TilingConfig  # noqa: E402

RSS_LIMIT_MB = 2000
TARGET_RATIO = 0.8


def tiling_benchmark():
    """benchmarks/tiling.py as a module (its slide writer), without making benchmarks/ a package."""
    spec = importlib.util.spec_from_file_location("tiling_benchmark", REPO / "benchmarks" / "tiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slide(work_dir: pathlib.Path, size: int, tile: int) -> pathlib.Path:
    """The manifest of a cached benchmark slide of side `size` (written once)."""
    folder = work_dir / f"slide_{size}_{tile}_jpeg"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        start = time.perf_counter()
        tiling_benchmark().write_slide(folder, size, tile, "jpeg")
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    return manifest


def copies(manifest: pathlib.Path, count: int) -> pathlib.Path:
    """A manifest of `count` copies of the manifest's one slide (ids s0, s1, ...), beside it."""
    with open(manifest, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    path = manifest.parent / f"copies_{count}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "image", "mask"])
        for i in range(count):
            writer.writerow([f"s{i}", manifest.parent / row["image"], manifest.parent / row["mask"]])
    return path


def train_run(work_dir: pathlib.Path, manifest: pathlib.Path, patch_size: int, model: str) -> pathlib.Path:
    """A DATA_DIR tiled from `manifest` and a two-step run of `model` on it (reused when present)."""
    from configs import tiny

    data_dir, workdir = work_dir / f"data_{patch_size}", work_dir / f"run_{model}_{patch_size}"
    if not (data_dir / "dataset_info.json").exists():
        # The slide twice, as a training and a validation slide: training needs both splits.
        with open(manifest, newline="") as handle:
            (row,) = list(csv.DictReader(handle))
        folder = manifest.parent
        both = work_dir / "train_manifest.csv"
        with open(both, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["slide_id", "image", "mask", "split"])
            for split in ("train", "validation"):
                writer.writerow([split, folder / row["image"], folder / row["mask"], split])
        tile_manifest(both, data_dir, TilingConfig(patch_size=patch_size, stride=patch_size), show_progress=False)
    if not (workdir / "checkpoints" / "latest").is_dir():
        shutil.rmtree(workdir, ignore_errors=True)
        config = tiny.get_config("erm")
        config.model.name = model
        config.data.dir = str(data_dir)
        config.method.empty_group = "drop"
        config.training.steps = 2
        registry.train(config, workdir)
    return workdir


def timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of `function()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_alone(classifier: inference.PatchClassifier, count: int, patch_shape: tuple[int, ...]) -> tuple[float, float]:
    """(wall, CPU) seconds of the classifier on `count` in-memory uint8 patches, fetched as the predictor does."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (classifier.batch_size, *patch_shape), dtype=np.uint8)
    np.asarray(classifier.dispatch(batch))  # compiled before the clock starts

    def run():
        batches = ((batch[:min(classifier.batch_size, count - i)], None)
                   for i in range(0, count, classifier.batch_size))
        for probabilities, _ in inference.predict_batches(classifier, batches):
            probabilities.sum()

    return timed(run)


def predict_subprocess(workdir: pathlib.Path, manifest: pathlib.Path, out: pathlib.Path, batch_size: int,
                       workers: int) -> tuple[float, float]:
    """(wall seconds including start-up, peak RSS in MB) of `predict.py` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    command = ["predict.py", "--workdir", str(workdir), "--checkpoint", "latest", "--manifest", str(manifest),
               "--out", str(out), "--batch-size", str(batch_size), "--workers", str(workers)]
    seconds, peak_mb, completed = tiling_benchmark().measured(
        command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3"))
    if completed.returncode != 0:
        sys.exit(f"predict.py failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return seconds, peak_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30000, help="side of the large slide in pixels")
    parser.add_argument("--train-size", type=int, default=2048, help="side of the slide the run trains on")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (predict, model alone); the median "
                        "round's figures are printed (the machine's speed drifts between runs)")
    parser.add_argument("--many-slides", type=int, default=6, help="slides of the many-slides measurement "
                        "(copies of one slide of --many-size; 0: skip)")
    parser.add_argument("--many-size", type=int, default=8192, help="side of each of those slides")
    parser.add_argument("--model", default="tiny", help="model.name of the run (tiny on CPU, resnet50 on a GPU)")
    parser.add_argument("--work-dir", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "gerne_predict_bench")
    args = parser.parse_args()
    cli.setup_logging()

    small = slide(args.work_dir, args.train_size, args.tile)
    large = slide(args.work_dir, args.size, args.tile)
    workdir = train_run(args.work_dir, small, args.patch_size, args.model)
    run = inference.load_run(workdir, "latest")
    tiling = run_data.data_tiling_config(run)
    settings = run_data.PredictionSettings(tiling=tiling, batch_size=args.batch_size, workers=args.workers,
                                             taus_list=(tuple(run.config.data.taus),))

    # The warm-up (compilation, the file in the page cache) also counts the slide's patches for the model.
    shutil.rmtree(args.work_dir / "warm_up", ignore_errors=True)  # a finished warm-up would be skipped
    warm_up = prediction.predict_manifest(run, large, args.work_dir / "warm_up", settings, show_progress=False)
    patches = int(warm_up["slides"][0]["patches"])
    out = args.work_dir / "predict_in_process"
    classifier = inference.PatchClassifier.from_run(run, args.batch_size)
    patch_shape = (args.patch_size, args.patch_size, len(run.metadata["channel_names"]))
    rounds = []  # (predict wall, predict CPU, model wall, model CPU) per round, side by side in time
    for _ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        # The model alone before and after the prediction, averaged: the machine's speed drifts by
        # more than the overhead measured within a minute, and a linear drift cancels out this way.
        before = model_alone(classifier, patches, patch_shape)
        results: list = []
        predicted = timed(lambda results=results: results.append(
            prediction.predict_manifest(run, large, out, settings, show_progress=False)))
        assert int(results[0]["slides"][0]["patches"]) == patches
        after = model_alone(classifier, patches, patch_shape)
        rounds.append((*predicted, (before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
    ratios = [model_seconds / predict_seconds for predict_seconds, _, model_seconds, _ in rounds]
    median = int(np.argsort(ratios)[len(ratios) // 2])  # the round of the median ratio
    predict_seconds, predict_cpu, model_seconds, model_cpu = rounds[median]

    many_rows = []
    if args.many_slides:
        manifest = copies(slide(args.work_dir, args.many_size, args.tile), args.many_slides)
        shutil.rmtree(args.work_dir / "predict_many", ignore_errors=True)
        results = []
        seconds, cpu = timed(lambda: results.append(prediction.predict_manifest(
            run, manifest, args.work_dir / "predict_many", settings, show_progress=False)))
        count = sum(int(row["patches"]) for row in results[0]["slides"])
        alone_seconds, alone_cpu = model_alone(classifier, count, patch_shape)
        many_rows = [
            (f"predict, {args.many_slides} slides of {args.many_size}^2",
             f"{seconds:8.1f} s  {count / seconds:10.1f} patches/s  ({cpu:.1f} CPU s; {count} patches)"),
            ("  model alone on as many patches", f"{alone_seconds:8.1f} s  {count / alone_seconds:10.1f} patches/s"
                                                 f"  ({alone_cpu:.1f} CPU s)"),
            ("  predict / model over the slides", f"{alone_seconds / seconds:8.2f}  (the slides pipelined: each "
                                                  "one's opening and writing overlap another's scan)")]

    subprocess_seconds, peak_mb = predict_subprocess(workdir, large, args.work_dir / "predict_subprocess",
                                                     args.batch_size, args.workers)
    with open(args.work_dir / "predict_subprocess" / "slides.csv", newline="") as handle:
        assert int(next(csv.DictReader(handle))["patches"]) == patches

    ratio = ratios[median]
    rows = [
        ("slide", f"{args.size} x {args.size} x 3 uint8, {args.tile} JPEG tiles, patch {args.patch_size}, "
                  f"{patches} patches with tissue"),
        ("run", f"model {args.model}, batch {classifier.batch_size}, {args.workers} reader threads, "
                f"devices: {run.mesh.devices.size} x {run.mesh.devices.flat[0].platform}"),
        ("model alone (in-memory patches)", f"{model_seconds:8.1f} s  {patches / model_seconds:10.1f} patches/s"
                                            f"  ({model_cpu:.1f} CPU s)"),
        ("predict (whole slide, in process)", f"{predict_seconds:8.1f} s  {patches / predict_seconds:10.1f} patches/s"
                                              f"  ({predict_cpu:.1f} CPU s)"),
        ("predict / model throughput", f"{ratio:8.2f}  (target >= {TARGET_RATIO}: "
                                       f"{'ok' if ratio >= TARGET_RATIO else 'MISSED'}; median of "
                                       f"{len(ratios)} rounds: {', '.join(f'{r:.2f}' for r in ratios)})"),
        ("predict / model, per CPU second", f"{model_cpu / predict_cpu:8.2f}  (the work ratio; steadier than "
                                            "wall time on a shared machine)"),
        *many_rows,
        ("predict.py subprocess (incl. start-up)", f"{subprocess_seconds:8.1f} s"),
        ("peak RSS of predict.py", f"{peak_mb:8.0f} MB  (limit {RSS_LIMIT_MB} MB: "
                                   f"{'ok' if peak_mb < RSS_LIMIT_MB else 'EXCEEDED'})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if peak_mb < RSS_LIMIT_MB and ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
