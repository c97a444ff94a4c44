"""The physical pixel size (microns per pixel) that a slide file states for its level 0.

`tiff_pixel_size` reads it from the first source a TIFF file has, in this order of precedence:

1. OME-XML: PhysicalSizeX / PhysicalSizeY of the first Image's Pixels element, in the unit of
   PhysicalSizeXUnit / PhysicalSizeYUnit (OME's default: µm); a missing PhysicalSizeY takes PhysicalSizeX.
2. Aperio SVS: "MPP = <microns>" in level 0's ImageDescription ("Aperio ...|key = value|...").
3. ImageJ: the description's "unit=<length unit>" with XResolution / YResolution in pixels per that unit
   (ImageJ writes ResolutionUnit NONE beside it).
4. TIFF tags of level 0: XResolution / YResolution (pixels per unit) with ResolutionUnit INCH (2),
   CENTIMETER (3), or DNG's MILLIMETER (4) / MICROMETER (5); a missing ResolutionUnit means INCH.

The first source present decides: if its value is unusable (not a number, <= 0, not a physical unit) the
answer is the reason, not a later source. Resolution tags coarser than 100 µm per pixel (below 254 dpi,
such as 72, 96 or 150 dpi) are the screen or print defaults many writers put into every TIFF, never a
microscope's, so they count as unusable. Pixels whose x and y sizes differ by more than 1 % are not
supported. A file without a usable size gets a one-phrase reason that completes "pixel size unknown: ...".

`check_mpp` checks a pixel size a user gives (`--mpp`, the manifest's `mpp` column).
"""
from __future__ import annotations

import dataclasses
import math
import unicodedata
import xml.etree.ElementTree as ElementTree

import tifffile

from gerne_jax.core.errors import InputError

# Microns per unit of the OME UnitsLength values a pixel can be measured in, and ImageJ's spellings
# ("micron", "um", "inch"). Keys are NFKC-normalized (`_unit_microns`): that folds the micro sign
# U+00B5 into Greek mu and the Angstrom sign U+212B into Å. OME units are case-sensitive (mm, Mm).
_MICRONS_PER_UNIT = {unicodedata.normalize("NFKC", unit): microns for unit, microns in {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "thou": 25.4, "in": 25400.0, "inch": 25400.0, "ft": 304800.0,
}.items()}
_NON_PHYSICAL_UNITS = ("pixel", "reference frame")  # OME units that are no physical length
# Microns per ResolutionUnit of the TIFF tag (tifffile.RESUNIT: NONE 1, INCH 2, CENTIMETER 3, and DNG's
# MILLIMETER 4, MICROMETER 5).
_MICRONS_PER_RESUNIT = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}
# Coarser TIFF resolutions are writers' screen / print defaults (72, 96, 150, 200 dpi), not a scanner's.
MAX_TIFF_TAG_MPP = 100.0
# Most relative difference between x and y pixel sizes still taken as square pixels.
ANISOTROPY_TOLERANCE = 0.01
NO_PIXEL_SIZE = "the file states no pixel size (no OME PhysicalSizeX, Aperio MPP or TIFF resolution in cm or inch)"


@dataclasses.dataclass(frozen=True)
class PixelSize:
    """Microns per pixel of a file's level 0, and where the value came from."""

    x: float
    y: float
    source: str  # e.g. "OME PhysicalSizeX/Y", "Aperio MPP", "TIFF resolution tags (centimeter)", "manifest mpp"

    @property
    def mpp(self) -> float:
        """The one size used: x (`tiff_pixel_size` returns only sizes whose y agrees within 1 %)."""
        return self.x


def positive_mpp(value: str | float) -> float | None:
    """`value` (text or number) as microns per pixel when it is a finite number > 0, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def check_mpp(value: float, what: str) -> float:
    """Returns `value` if it is a finite number > 0, else raises InputError naming `what` and the value."""
    number = positive_mpp(value)
    if number is None:
        raise InputError(f"{what}: must be a positive number of microns per pixel, got {value!r}")
    return number


def tiff_pixel_size(tiff: tifffile.TiffFile) -> PixelSize | str:
    """The level-0 pixel size a TIFF file states, or a one-phrase reason why it states none usable."""
    for source in (_ome_pixel_size, _aperio_pixel_size, _imagej_pixel_size, _tag_pixel_size):
        found = source(tiff)
        if found is not None:
            return found if isinstance(found, str) else isotropic(found)
    return NO_PIXEL_SIZE


def isotropic(size: PixelSize) -> PixelSize | str:
    """`size`, or the reason it is refused: x and y more than `ANISOTROPY_TOLERANCE` apart."""
    if abs(size.x - size.y) > ANISOTROPY_TOLERANCE * max(size.x, size.y):
        return f"anisotropic pixels x={size.x:g}, y={size.y:g} µm ({size.source}) are not supported"
    return size


def _positive(text: str, what: str) -> float | str:
    """`text` as a finite number > 0, else the reason naming `what`."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return f"{what} {text!r} is not a number"
    if not math.isfinite(value):
        return f"{what} is {value} (must be a finite number)"
    if value <= 0:
        return f"{what} is {value:g} (must be > 0)"
    return value


def _unit_microns(unit: str, what: str) -> float | str:
    """Microns per `unit`, else the reason naming `what`."""
    microns = _MICRONS_PER_UNIT.get(unicodedata.normalize("NFKC", unit.strip()))
    if microns is not None:
        return microns
    if unit.strip() in _NON_PHYSICAL_UNITS:
        return f"{what} unit {unit!r} is not a physical unit"
    return f"{what} unit {unit!r} is not a known length unit (known: {', '.join(_MICRONS_PER_UNIT)})"


# -- the sources: each returns None when the file lacks it, else a PixelSize or the reason ---------------
def _ome_pixel_size(tiff: tifffile.TiffFile) -> PixelSize | str | None:
    if not tiff.is_ome or not tiff.ome_metadata:
        return None
    try:
        root = ElementTree.fromstring(tiff.ome_metadata)
    except ElementTree.ParseError as error:
        return f"the OME-XML metadata is not valid XML ({error})"
    # The namespace changes with the OME schema version (2013-06, 2016-06, ...): match local names.
    image = next((e for e in root if _local_name(e.tag) == "Image"), None)
    pixels = None if image is None else next((e for e in image if _local_name(e.tag) == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    sizes = []
    for axis in ("X", "Y") if pixels.get("PhysicalSizeY") is not None else ("X", "X"):
        what = f"OME PhysicalSize{axis}"
        value = _positive(pixels.get(f"PhysicalSize{axis}"), what)
        microns = _unit_microns(pixels.get(f"PhysicalSize{axis}Unit", "µm"), what)
        for found in (value, microns):
            if isinstance(found, str):
                return found
        sizes.append(value * microns)
    return PixelSize(sizes[0], sizes[1], "OME PhysicalSizeX/Y")


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _aperio_pixel_size(tiff: tifffile.TiffFile) -> PixelSize | str | None:
    if not tiff.is_svs:
        return None
    # "Aperio Image Library vX\r\n<header>|AppMag = 20|MPP = 0.2520|...": the same pairs tifffile's
    # `svs_description_metadata` reads, which tifffile does not export.
    pairs = (item.partition("=") for item in tiff.pages.first.description.split("|")[1:])
    mpp = next((value.strip() for key, sign, value in pairs if sign and key.strip() == "MPP"), None)
    if mpp is None:
        return None
    value = _positive(mpp, "Aperio MPP")
    return value if isinstance(value, str) else PixelSize(value, value, "Aperio MPP")


def _imagej_pixel_size(tiff: tifffile.TiffFile) -> PixelSize | str | None:
    unit = (tiff.imagej_metadata or {}).get("unit") if tiff.is_imagej else None
    if not unit:
        return None
    # ImageJ escapes non-ASCII in its description: "\u00B5m" for µm.
    unit = str(unit).replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    microns = _unit_microns(unit, "ImageJ")
    if isinstance(microns, str):
        return microns
    resolution = _resolution(_level0_page(tiff))
    if resolution is None:
        return f"the ImageJ unit is {unit!r} but the TIFF has no XResolution tag"
    if isinstance(resolution, str):
        return resolution
    return PixelSize(microns / resolution[0], microns / resolution[1], f"ImageJ unit {unit!r} and TIFF resolution")


def _tag_pixel_size(tiff: tifffile.TiffFile) -> PixelSize | str | None:
    page = _level0_page(tiff)
    resolution = _resolution(page)
    if resolution is None or isinstance(resolution, str):
        return resolution
    unit = page.tags.valueof(296, default=tifffile.RESUNIT.INCH)  # ResolutionUnit; TIFF's default
    if unit == tifffile.RESUNIT.NONE:
        return "the TIFF resolution unit is NONE (not a physical unit)"
    if unit not in _MICRONS_PER_RESUNIT:
        return f"the TIFF resolution unit {unit!r} is not a known unit"
    name = tifffile.RESUNIT(unit).name.lower()
    microns = _MICRONS_PER_RESUNIT[unit]
    size = PixelSize(microns / resolution[0], microns / resolution[1], f"TIFF resolution tags ({name})")
    if max(size.x, size.y) > MAX_TIFF_TAG_MPP:
        dpi = 25400.0 / max(size.x, size.y)
        stated = f"{dpi:.4g} dpi" if unit == tifffile.RESUNIT.INCH else (
            f"{min(resolution):.4g} pixels per {name} ({dpi:.4g} dpi)")
        return f"the TIFF resolution {stated} is a screen or print default, not a microscope's"
    return size


def _level0_page(tiff: tifffile.TiffFile) -> tifffile.TiffPage:
    return tiff.series[0].keyframe if tiff.series else tiff.pages.first


def _resolution(page: tifffile.TiffPage) -> tuple[float, float] | str | None:
    """XResolution, YResolution (pixels per unit; a missing Y takes X), None without XResolution, or the
    reason they are unusable. Read from the tags, since tifffile's `get_resolution` turns a missing tag
    into 1."""
    values = []
    for code, name in ((282, "XResolution"), (283, "YResolution")):
        rational = page.tags.valueof(code)
        if rational is None:
            if code == 282:
                return None
            values.append(values[0])
            continue
        try:
            numerator, denominator = rational
            value = numerator / denominator
        except (TypeError, ValueError, ZeroDivisionError):
            return f"the TIFF {name} {rational!r} is not a number"
        if not (math.isfinite(value) and value > 0):
            return f"the TIFF {name} is {value:g} (must be > 0)"
        values.append(value)
    return values[0], values[1]
