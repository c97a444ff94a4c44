"""The slide manifest: a CSV with one row per slide, naming its image channels, masks, patient and split.

`read_manifest` checks every row (files exist, ids unique, one of image / channels, valid split and
channel names) before any pixel is read, so a bad manifest fails at once and names its line.
`SlideError` is here, beside `SlideSpec`, because both the manifest and the slide reader
(`gerne_jax.slides.reader`) raise it.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib

from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset
from gerne_jax.slides import physical

MANIFEST_COLUMNS = ("slide_id", "image", "channels", "mask", "annotations", "tissue_mask", "patient_id", "split",
                    "channel_names", "mpp")


class SlideError(InputError):
    """A problem with one slide's files; the message names the slide, the file and the problem."""

    def __init__(self, slide_id: str, file: str | pathlib.Path | None, problem: str):
        self.slide_id = slide_id
        self.file = None if file is None else str(file)
        self.problem = problem
        where = f"slide {slide_id!r}" + ("" if file is None else f", file {str(file)!r}")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keeps the three fields when sent between worker processes
        return type(self), (self.slide_id, self.file, self.problem)


@dataclasses.dataclass(frozen=True)
class SlideSpec:
    """One manifest row: where a slide's image channels and masks are."""

    slide_id: str
    image_files: tuple[pathlib.Path, ...]  # one multichannel file, or one file per channel
    mask_file: pathlib.Path | None         # None only where masks are optional (prediction)
    tissue_mask_file: pathlib.Path | None = None
    patient_id: str | None = None
    split: str | None = None
    channel_names: tuple[str, ...] | None = None
    annotations_file: pathlib.Path | None = None  # QuPath GeoJSON: labels (and tissue) instead of raster masks
    mpp: float | None = None                       # microns per level-0 pixel, overriding the file's

    @property
    def has_labels(self) -> bool:
        """Whether the slide has a tumour mask or annotations, so its patches are labelled and scored."""
        return self.mask_file is not None or self.annotations_file is not None


def read_manifest(path: str | pathlib.Path, require_mask: bool = True) -> list[SlideSpec]:
    """Reads a slide manifest CSV; relative paths are resolved against the manifest's folder.

    Columns: `slide_id`, exactly one of `image` / `channels` (`;`-separated) per row, and per row exactly
    one of `mask` (a raster tumour mask) and `annotations` (a QuPath GeoJSON file); optional `tissue_mask`,
    `patient_id`, `split` (train / validation / test), `channel_names` (`;`-separated), `mpp` (microns per
    level-0 pixel, overriding what the file states). With `require_mask=False` (prediction) neither mask
    nor annotations is needed. Raises InputError for a bad header or empty manifest, SlideError for a bad
    row (missing file, duplicate id, both or neither image/channels, bad split, channel names or mpp).
    """
    path = pathlib.Path(path)
    root = path.parent
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise InputError(f"manifest {str(path)!r}: cannot open: {error}") from error
    with handle:
        rows = csv.DictReader(handle)
        header = [name.strip() for name in (rows.fieldnames or [])]
        if not header:
            raise InputError(f"manifest {str(path)!r}: no header row")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise InputError(f"manifest {str(path)!r}: repeated column(s) {repeated}")
        unknown = [name for name in header if name not in MANIFEST_COLUMNS]
        if unknown:
            raise InputError(f"manifest {str(path)!r}: unknown column(s) {unknown}; "
                             f"allowed: {list(MANIFEST_COLUMNS)}")
        missing = [] if "slide_id" in header else ["slide_id"]
        if not ("image" in header or "channels" in header):
            missing.append("image or channels")
        if require_mask and not ("mask" in header or "annotations" in header):
            missing.append("mask or annotations")
        if missing:
            raise InputError(f"manifest {str(path)!r}: missing column(s) {missing}")
        rows.fieldnames = header
        specs: list[SlideSpec] = []
        first_line_of: dict[str, int] = {}
        for row in rows:
            line = rows.line_num  # physical line, as an editor shows it
            if None in row:
                raise InputError(f"manifest {str(path)!r}, line {line}: more values than columns")
            values = {name: (value or "").strip() for name, value in row.items()}
            spec = _parse_row(values, line, root, path, require_mask)
            if spec.slide_id in first_line_of:
                raise SlideError(spec.slide_id, path, f"duplicate slide_id on lines "
                                 f"{first_line_of[spec.slide_id]} and {line}")
            first_line_of[spec.slide_id] = line
            specs.append(spec)
    if not specs:
        raise InputError(f"manifest {str(path)!r}: no slides")
    return specs


def _parse_row(values: dict[str, str], line: int, root: pathlib.Path,
               manifest: pathlib.Path, require_mask: bool) -> SlideSpec:
    slide_id = values.get("slide_id", "")
    if not slide_id:
        raise InputError(f"manifest {str(manifest)!r}, line {line}: empty slide_id")

    def fail(problem: str, file: pathlib.Path | str = manifest) -> SlideError:
        return SlideError(slide_id, file, f"{problem} (manifest line {line})")

    def existing_file(text: str) -> pathlib.Path:
        file = pathlib.Path(text).expanduser()
        file = file if file.is_absolute() else root / file
        if not file.is_file():
            raise fail("file not found", file)
        return file

    def split_list(column: str) -> list[str]:
        items = [item.strip() for item in values.get(column, "").split(";")]
        if any(not item for item in items):
            raise fail(f"empty entry in {column!r}: {values[column]!r}")
        return items

    image, channels = values.get("image", ""), values.get("channels", "")
    if bool(image) == bool(channels):
        raise fail("exactly one of 'image' and 'channels' must be given, found "
                   + ("both" if image else "neither"))
    image_files = (existing_file(image),) if image else tuple(existing_file(f)
                                                              for f in split_list("channels"))
    if values.get("mask") and values.get("annotations"):
        raise fail("give 'mask' or 'annotations', not both")
    if require_mask and not (values.get("mask") or values.get("annotations")):
        raise fail("empty 'mask' and 'annotations': the slide has no labels")
    mask_file = existing_file(values["mask"]) if values.get("mask") else None
    annotations_file = existing_file(values["annotations"]) if values.get("annotations") else None
    tissue_mask_file = existing_file(values["tissue_mask"]) if values.get("tissue_mask") else None
    split = values.get("split") or None
    if split is not None and split not in dataset.SPLITS:
        raise fail(f"bad split {split!r}; expected one of {list(dataset.SPLITS)} or empty")
    channel_names = tuple(split_list("channel_names")) if values.get("channel_names") else None
    if channel_names is not None:
        if len(set(channel_names)) != len(channel_names):
            raise fail(f"duplicate channel names {list(channel_names)}")
        if channels and len(channel_names) != len(image_files):
            raise fail(f"{len(channel_names)} channel names for {len(image_files)} channel files")
    mpp = physical.positive_mpp(values["mpp"]) if values.get("mpp") else None
    if values.get("mpp") and mpp is None:
        raise fail(f"mpp must be a positive number of microns per pixel, got {values['mpp']!r}")
    return SlideSpec(slide_id=slide_id, image_files=image_files, mask_file=mask_file,
                     tissue_mask_file=tissue_mask_file, patient_id=values.get("patient_id") or None,
                     split=split, channel_names=channel_names, annotations_file=annotations_file, mpp=mpp)
