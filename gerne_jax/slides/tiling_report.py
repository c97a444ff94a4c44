"""The tiling report, `DATA_DIR/tiling_report.json`: its one writer (the tiler) and its one reader.

The tiler writes it beside the shards (`data_pipeline.tile_manifest`): `config`, the tiling settings
under their on-disk names (`scan.config_on_disk`), and `slides`, slide id -> its entry (`status`,
`split`, patch counts, or the `error` of a failed slide), sorted by slide id. Runs store what it says
in their data spec (`gerne_jax.runs.run_log.data_spec_of`), from which prediction takes the tiling
settings and each slide's split.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from gerne_jax.core import files
from gerne_jax.data import dataset
from gerne_jax.slides.scan import TilingConfig, config_on_disk

FILE_NAME = "tiling_report.json"


def write(data_dir: Any, config: TilingConfig, slides: Mapping[str, Mapping[str, Any]],
          write_text: Callable[[Any, str], None] = files.write_text_atomic) -> None:
    """Writes the report of `slides` tiled with `config` into `data_dir` with `write_text(path, text)`:
    a local folder by default; the tiler passes its writer of local folders and URLs
    (`data_pipeline.storage.write_text`, `data_dir` then its path type)."""
    content = {"config": config_on_disk(config), "slides": dict(sorted(slides.items()))}
    write_text(data_dir / FILE_NAME, json.dumps(content, indent=2))


def read(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The DATA_DIR's tiling report, None where it has none: `config`, the tiler's settings (code names),
    and `slides`, slide id -> its entry (`split`, `status`, patch counts)."""
    path = pathlib.Path(data_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        return {"config": dataset.from_disk(stored["config"]), "slides": dict(stored["slides"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise dataset.DatasetError(f"{path}: cannot read the tiling report ({type(error).__name__}: "
                                   f"{error})") from None


def tiling_settings(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The `TilingConfig` fields of a report's `config` (its JSON lists back to tuples, empty ones None)."""
    settings = {field.name: stored[field.name] for field in dataclasses.fields(TilingConfig) if field.name in stored}
    for name in ("tumour_ids", "channels", "tumour_classes", "tissue_classes"):
        settings[name] = tuple(settings[name]) if settings.get(name) else None
    return settings
