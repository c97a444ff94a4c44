"""What a run's data fixes for prediction: the tiling settings and the slide format.

A run predicts with the settings its data was tiled with (`data_tiling_config`, from the run's data
spec: the DATA_DIR's tiling report and metadata, `run_log.DataSpec`), and only slides of the format it
was trained on (`check_format`: channel count, names and order, dtype and level downsample).
`PredictionSettings` adds the prediction's own settings.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gerne_jax.core.errors import InputError
from gerne_jax.predict import inference
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

    Patch size, level and downsample are the model's input and cannot be overridden.
    """
    stored, metadata = run.data_spec.tiling, run.metadata
    if stored is not None:
        stored = dict(stored, tumour_ids=tuple(stored["tumour_ids"]) if stored.get("tumour_ids") else None)
        settings = {field.name: stored[field.name] for field in dataclasses.fields(TilingConfig)
                    if field.name in stored}
    else:
        settings = {"patch_size": metadata["patch_size"], "stride": metadata["stride"],
                    "level": metadata.get("level", 0), "min_tumour_pixels": metadata["min_tumour_pixels"],
                    "min_tissue_ratio": metadata["min_tissue_ratio"]}
        if metadata.get("level_downsample", 1) > 1 and not metadata.get("level"):
            settings["downsample"] = metadata["level_downsample"]
    fixed = {"patch_size", "level", "downsample"}
    settings.update({key: value for key, value in overrides.items() if value is not None and key not in fixed})
    return TilingConfig(**settings)


def check_format(spec: SlideSpec, reader: SlideReader, metadata: dict[str, Any]) -> None:
    """A slide must have the channel count, dtype and level downsample of the run's data (`metadata`, the
    run's data spec's), and its channel names in the same order where both name their channels."""
    found = (reader.num_channels, np.dtype(reader.dtype).name, int(reader.level_downsample))
    expected = (len(metadata["channel_names"]), str(metadata["source_dtype"]), int(metadata["level_downsample"]))
    if found != expected:
        raise SlideError(spec.slide_id, spec.image_files[0], f"does not match the run's data: the slide has "
                         f"{found[0]} channel(s) of {found[1]} at level downsample {found[2]}, the model was "
                         f"trained on {expected[0]} channel(s) of {expected[1]} at level downsample {expected[2]}")
    names, trained = tuple(reader.channel_names), tuple(metadata["channel_names"])
    # Placeholder names (no manifest column, no OME names) say nothing about the channels: a slide without
    # names is taken in the manifest's order, as the tiler takes it.
    placeholders = placeholder_channel_names(len(names))
    if names != trained and placeholders not in (names, trained):
        raise SlideError(spec.slide_id, spec.image_files[0], f"does not match the run's data: the slide's "
                         f"channels are {list(names)}, the model was trained on {list(trained)} (in this order)")
