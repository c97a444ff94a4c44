"""One slide through a trained run: open it, classify its patches, write its files.

`open_slide` opens a slide with the run's data settings (`run_data`), checks its format and detects its
tissue with the tiler's own `gerne_jax.slides.scan.SlideScan`, so it classifies exactly the patches the
tiler would keep. `scan_slide` classifies them: a pool of reader threads (sharing the slide's one
`SlideReader` and its chunk cache) reads blocks ahead into a bounded queue, and the patches are copied
into fixed-size batches for the jitted, sharded `inference.PatchClassifier`; nothing holds more than a
few blocks of the slide. `write_slide` writes its files into `OUT/slides/<slide_id>/`: `probability.ome.tif` and
`detections.geojson` (`qupath_outputs`: they open over the slide in QuPath), `overlay.png`, `patches.csv`,
`regions.geojson` and last `summary.json`, which
marks the slide finished (`load_finished`): a rerun with the same run, checkpoint, settings and files
skips it, and a slide killed half-way (no summary) is redone (`start_slide`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.evaluation import evaluate
from gerne_jax.predict import inference, qupath_outputs, slide_outputs
from gerne_jax.predict.run_data import PredictionSettings, check_format, match_channels
from gerne_jax.slides.manifest import SlideSpec
from gerne_jax.slides.reader import SlideReader
from gerne_jax.slides.scan import SlideScan, fingerprint, level0, open_reader, record_qc_rows

SLIDES_DIR = "slides"
PROBABILITY_MAP = "probability.ome.tif"
SUMMARY_FILE = "summary.json"
# Source bytes one read block may hold; several are in flight (2 per reader thread).
PREDICT_BLOCK_BYTES = 32 << 20


def slide_dir(out: pathlib.Path, slide_id: str) -> pathlib.Path:
    return out / SLIDES_DIR / slide_id


def _run_fingerprint(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings) -> dict[str, Any]:
    return json.loads(json.dumps({
        "slide": fingerprint(spec, settings.tiling), "mask": spec.has_labels,
        "workdir": str(run.workdir.absolute()), "checkpoint": run.checkpoint,
        "checkpoint_step": run.checkpoint_meta.get("step"), "threshold": settings.threshold,
        "taus": settings.taus_list}))


@dataclasses.dataclass
class OpenedSlide:
    """A slide opened, checked and with its tissue detected (`open_slide`), ready to scan; close it after."""

    spec: SlideSpec
    reader: SlideReader
    scan: SlideScan

    def close(self) -> None:
        self.reader.close()


@dataclasses.dataclass
class ScannedSlide:
    """What the scan of one slide found (`scan_slide`): everything `write_slide` needs, no open file."""

    spec: SlideSpec
    shape: tuple[int, int]
    level_downsample: int
    scale: float                           # level-0 pixels per pixel read (`SlideReader.scale`)
    base_shape: tuple[int, int]            # level 0's
    base_mpp: float | None                 # microns per level-0 pixel, where known
    factor: int
    thumbnail: np.ndarray
    qc_tissue: np.ndarray
    qc_tumour: np.ndarray
    probability_map: slide_outputs.ProbabilityMap
    probabilities: np.ndarray              # [n, K]
    fields: dict[str, np.ndarray]          # x, y (chosen level), tissue_ratio, tumour_pixels


def open_slide(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings) -> OpenedSlide:
    """Opens a slide with the run's data settings, checks its format and detects its tissue (SlideError)."""
    config = settings.tiling
    reader = open_reader(spec, dataclasses.replace(config, channels=None))  # `match_channels` picks them
    reader.__enter__()
    try:
        match_channels(spec, reader, run.metadata)
        check_format(spec, reader, run.metadata)
        # The mask's values are checked block by block as the scan reads it (a label map stops the slide
        # before anything is written): decoding the whole mask up front would cost a second pass.
        reader.validate(mask_values=False)
        return OpenedSlide(spec, reader, SlideScan(reader, config, band_bytes=PREDICT_BLOCK_BYTES))
    except BaseException:
        reader.close()
        raise


def scan_slide(opened: OpenedSlide, classifier: inference.PatchClassifier, settings: PredictionSettings,
               progress: Callable[[int], None] = lambda positions: None) -> ScannedSlide:
    """Classifies every patch the scan keeps: reader threads fill a bounded queue of blocks while the model
    works on the batch before (module docstring)."""
    reader, scan, config = opened.reader, opened.scan, settings.tiling
    lowres_shape = scan.thumbnail.shape[:2]
    qc_tissue = scan.detected.copy() if scan.detected is not None else np.zeros(lowres_shape, bool)
    qc_tumour = np.zeros(lowres_shape, bool)
    probability_map = slide_outputs.ProbabilityMap(reader.shape, config.patch_size, config.stride)

    # One reader for every reader thread: its cache of decoded segments decodes a TIFF tile row that
    # two blocks share once, not once per thread (a thread needing a segment another decodes waits).
    def read(block):
        patches = scan.read_block(block)
        record_qc_rows(qc_tissue, qc_tumour, patches.tissue, patches.tumour, patches.y0, patches.x0, scan.factor)
        bands = patches.bands
        # Views into the read rows: `rebatch` copies each patch once, straight into its batch.
        images = [band.patch(i) for band in bands for i in range(band.x.size)]
        fields = {"x": np.concatenate([band.x for band in bands]),
                  "y": np.concatenate([np.full(band.x.size, band.y, np.int64) for band in bands]),
                  "tissue_ratio": np.concatenate([band.tissue_ratio for band in bands]),
                  "tumour_pixels": np.concatenate([band.tumour_pixels for band in bands])}
        return images, fields, sum(band.positions for band in bands)

    def chunks():
        for images, fields, positions in inference.ordered_map(read, scan.plan, settings.workers):
            progress(positions)
            yield images, fields

    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for probabilities, fields in inference.predict_batches(
            classifier, inference.rebatch(chunks(), classifier.batch_size, buffers=inference.PIPELINE_DEPTH)):
        probability_map.add(fields["y"], fields["x"], probabilities[:, 1])
        parts.append((probabilities, fields))
    probabilities = (np.concatenate([p for p, _ in parts]) if parts
                     else np.zeros((0, len(dataset.CLASS_NAMES)), np.float32))
    joined = {name: np.concatenate([f[name] for _, f in parts]) if parts else np.zeros(0)
              for name in ("x", "y", "tissue_ratio", "tumour_pixels")}
    if not parts:
        # At microns per pixel the pixels read are resampled: their size, not the pyramid level, says the scale.
        scale = (f"{reader.mpp:g} µm/pixel" if config.mpp is not None
                 else f"level downsample {reader.level_downsample}")
        warnings.warn(f"slide {opened.spec.slide_id!r}: no patch to classify ({reader.shape[0]} x {reader.shape[1]} "
                      f"pixels at {scale}, patch size {config.patch_size}, tissue ratio must exceed "
                      f"{config.min_tissue_ratio}); its map is empty", stacklevel=2)
    return ScannedSlide(opened.spec, reader.shape, reader.level_downsample, reader.scale, reader.base_shape,
                        reader.base_mpp, scan.factor, scan.thumbnail,
                        qc_tissue, qc_tumour, probability_map, probabilities, joined)


def write_slide(scanned: ScannedSlide, run: inference.RestoredRun, settings: PredictionSettings,
                out: pathlib.Path) -> dict[str, Any]:
    """Writes one scanned slide's files (module docstring), `summary.json` last; returns the summary."""
    spec, config, d = scanned.spec, settings.tiling, scanned.level_downsample
    P, folder = config.patch_size, slide_dir(out, spec.slide_id)
    has_mask = spec.has_labels
    probabilities, fields = scanned.probabilities, scanned.fields
    table = {"x": level0(fields["x"], scanned.scale), "y": level0(fields["y"], scanned.scale),
             "tissue_ratio": fields["tissue_ratio"].astype(np.float32),
             "probability": probabilities[:, 1], "probability_non_tumour": probabilities[:, 0],
             "prediction": probabilities.argmax(axis=1).astype(np.int32)}
    if has_mask:
        table["label"] = (fields["tumour_pixels"] >= config.min_tumour_pixels).astype(np.int32)
        table["tumour_fraction"] = (fields["tumour_pixels"] / P**2).astype(np.float32)
    count = int(probabilities.shape[0])

    probability_map = scanned.probability_map
    values, scale = probability_map.values(), probability_map.cell * scanned.scale
    slide_outputs.write_patch_table(folder / "patches.csv", spec.slide_id, table)
    written = qupath_outputs.write_probability_ome_tiff(folder / PROBABILITY_MAP, values, scale, scanned.base_shape,
                                                        scanned.base_mpp, {
        "slide_id": spec.slide_id, "patch_size": P, "stride": config.stride,
        "values": "mean tumour probability of the patches covering the pixel, NaN where no patch was classified"})
    slide_outputs.write_geojson(folder / "detections.geojson", qupath_outputs.patch_detections(
        table["x"], table["y"], P * scanned.scale, table["probability"], {"tissue_ratio": table["tissue_ratio"]}))
    regions = slide_outputs.tumour_regions(values, settings.threshold, scale)
    slide_outputs.write_geojson(folder / "regions.geojson", regions)
    tumour_share = float(np.mean(table["prediction"] == 1)) if count else float("nan")
    title = (f"{spec.slide_id}: {count} patches, {tumour_share:.1%} predicted tumour"
             if count else f"{spec.slide_id}: no patch with tissue")
    slide_outputs.save_overlay(folder / "overlay.png", scanned.thumbnail, scanned.factor, scanned.qc_tissue,
                               scanned.qc_tumour if has_mask else None, values, probability_map.cell,
                               f"{title} (run {run.workdir.name}, {run.checkpoint})")
    summary = {
        "slide_id": spec.slide_id, "shape": list(scanned.shape), "level_downsample": d, "patches": count,
        "tumour_patch_share": tumour_share,
        "above_threshold_share": float(np.mean(table["probability"] >= settings.threshold)) if count else float("nan"),
        "mean_probability": float(np.mean(table["probability"])) if count else float("nan"),
        "max_probability": float(np.max(table["probability"])) if count else float("nan"),
        "tumour_regions": len(regions["features"]), "map_scale": scale, "probability_map": written,
        "has_mask": has_mask,
        "fingerprint": _run_fingerprint(spec, run, settings),
    }
    if has_mask:
        summary["label_tumour_share"] = float(np.mean(table["label"])) if count else float("nan")
        summary["results"] = (evaluate.report_per_tau(probabilities, table["label"], table["tissue_ratio"],
                                                        settings.taus_list) if count else {})
    files.write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, allow_nan=True))
    return summary


def start_slide(spec: SlideSpec, out: pathlib.Path) -> None:
    """Marks a slide unfinished (its summary removed) and removes what a killed run left half-written."""
    folder = slide_dir(out, spec.slide_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY_FILE).unlink(missing_ok=True)  # a rerun of a changed slide: not finished until the end
    for stale in folder.glob("*.tmp-*"):
        stale.unlink()


def load_finished(spec: SlideSpec, run: inference.RestoredRun, settings: PredictionSettings,
                  out: pathlib.Path) -> dict[str, Any] | None:
    """The slide's summary if it was predicted with the same run, checkpoint, settings and files."""
    path = slide_dir(out, spec.slide_id) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("fingerprint") == _run_fingerprint(spec, run, settings) else None
