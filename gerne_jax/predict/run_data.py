"""What a run's data fixes for prediction: the tiling settings and the slide format.

A run predicts with the settings its data was tiled with (`data_tiling_config`, from the run's data
spec: the DATA_DIR's tiling report and metadata, `run_log.DataSpec`): at its microns per pixel when it
was tiled at one, with its channels picked by name (`match_channels`), and only slides of the format it
was trained on (`check_format`: channel count, dtype and level downsample).
`PredictionSettings` adds the prediction's own settings.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from gerne_jax.core.errors import InputError
from gerne_jax.predict import inference
from gerne_jax.slides import tiling_report
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.reader import SlideReader, placeholder_channel_names
from gerne_jax.slides.scan import TilingConfig


@dataclasses.dataclass(frozen=True)
class PredictionSettings:
    """How slides are predicted; everything but `workers` and `batch_size` goes into the resume check."""

    tiling: TilingConfig
    threshold: float = 0.5
    taus_list: tuple[tuple[float, ...], ...] = ((0.1,),)
    batch_size: int = 256
    workers: int = 2

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")


def data_tiling_config(run: inference.RestoredRun, **overrides: Any) -> TilingConfig:
    """The tiling settings the run's data was made with, from the run's data spec: its tiling report's
    config where the DATA_DIR had one (tissue polarity, factor, tumour ids too), else its metadata's;
    `overrides` (not None) win.

    Patch size, scale (level, downsample, mpp) and channels are the model's input and cannot be overridden.
    """
    stored, metadata = run.data_spec.tiling, run.metadata
    if stored is not None:
        settings = tiling_report.tiling_settings(stored)
    else:
        settings = {"patch_size": metadata["patch_size"], "stride": metadata["stride"],
                    "level": metadata.get("level", 0), "min_tumour_pixels": metadata["min_tumour_pixels"],
                    "min_tissue_ratio": metadata["min_tissue_ratio"]}
        if tiled_at_mpp(metadata):
            settings["mpp"] = metadata["mpp"]
        elif metadata.get("level_downsample", 1) > 1 and not metadata.get("level"):
            settings["downsample"] = metadata["level_downsample"]
    fixed = {"patch_size", "level", "downsample", "mpp", "channels"}
    settings.update({key: value for key, value in overrides.items() if value is not None and key not in fixed})
    return TilingConfig(**settings)


def tiled_at_mpp(metadata: dict[str, Any]) -> bool:
    """Whether a DATA_DIR's metadata says it was tiled at microns per pixel (no level downsample)."""
    return "level_downsample" in metadata and metadata["level_downsample"] is None


def match_channels(spec: SlideSpec, reader: SlideReader, metadata: dict[str, Any]) -> None:
    """Reads the slide's channels in the order the run was trained on, by name (reordered, or picked from
    more channels; a SlideError names the missing ones). Placeholder names (no manifest column, no OME
    names) say nothing about the channels: where the run's or the slide's channels are unnamed, the slide
    is taken in its own order, as the tiler took it, with a warning where the run's are named."""
    trained = tuple(metadata["channel_names"])
    unnamed_run = trained == placeholder_channel_names(len(trained))
    unnamed_slide = reader.file_channel_names == placeholder_channel_names(len(reader.file_channel_names))
    if unnamed_slide and not unnamed_run and len(trained) == reader.num_channels:
        warnings.warn(f"slide {spec.slide_id!r} names none of its channels; they are taken in the order the run "
                      f"was trained on {list(trained)} (give the manifest's channel_names to check)", stacklevel=2)
    elif not (unnamed_run or unnamed_slide):
        reader.select_channels(trained)


def check_format(spec: SlideSpec, reader: SlideReader, metadata: dict[str, Any]) -> None:
    """A slide (its channels matched, `match_channels`) must have the channel count, dtype and level
    downsample of the run's data (`metadata`, the run's data spec's); at microns per pixel, the reader reads
    it at the run's scale whatever its level."""
    at_mpp = tiled_at_mpp(metadata)
    found = (reader.num_channels, np.dtype(reader.dtype).name, None if at_mpp else int(reader.level_downsample))
    expected = (len(metadata["channel_names"]), str(metadata["source_dtype"]), metadata.get("level_downsample", 1))
    if found != expected:
        scale = f"{metadata['mpp']:g} µm/pixel" if at_mpp else f"level downsample {expected[2]}"
        raise SlideError(spec.slide_id, spec.image_files[0], f"does not match the run's data: the slide has "
                         f"{found[0]} channel(s) of {found[1]}" + ("" if at_mpp else f" at level downsample {found[2]}")
                         + f", the model was trained on {expected[0]} channel(s) of {expected[1]} at {scale}")
