"""The tiling application's commands: `gerne-jax synthetic|tile|stats` (also `python -m data_pipeline ...`).

The arguments are declared here and parsed before the command's module (`synthetic.writing`, `tile_manifest`,
`stats`, each with `run(args) -> int`) is imported: `--help` and a mistyped option answer at once,
without loading the slide readers, TFDS or matplotlib. Known failures (a broken slide, a bad manifest
or option, a missing dataset) raise an `InputError` naming what is wrong; `gerne_jax.core.cli.run_command`
prints it as one line and exits with status 2, so every command answers bad input alike. The
functions here let them propagate for callers and tests.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

from data_pipeline.synthetic import layouts, writing
from gerne_jax.core import cli
from gerne_jax.slides.grid import THUMBNAIL_SIDE


def synthetic(argv: list[str]) -> int:
    """Write built-in synthetic multimodal slides, their masks and a manifest."""
    return writing.run(parse_args("synthetic", argv))  # a light module, imported above


def tile(argv: list[str]) -> int:
    """Tile the slides of a manifest into a DATA_DIR of patch shards (resumable, local or Beam)."""
    args = parse_args("tile", argv)
    from data_pipeline import tile_manifest

    return tile_manifest.run(args)


def stats(argv: list[str]) -> int:
    """Print a DATA_DIR's group counts per split and tau; plot its tissue-ratio distribution."""
    args = parse_args("stats", argv)
    from data_pipeline import stats as module

    return module.run(args)


COMMANDS = {"synthetic": synthetic, "tile": tile, "stats": stats}


def main(argv: list[str] | None = None) -> int | None:
    """`python -m data_pipeline COMMAND ...`."""
    return cli.dispatch("python -m data_pipeline", {name: (lambda c=c: c) for name, c in COMMANDS.items()},
                        sys.argv[1:] if argv is None else argv)


def parse_args(name: str, argv: list[str]) -> argparse.Namespace:
    """The arguments of command `name` (argparse exits with status 2 on a bad one)."""
    parser = argparse.ArgumentParser(prog=f"gerne-jax {name}", description=COMMANDS[name].__doc__)
    ARGUMENTS[name](parser)
    return parser.parse_args(argv)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message for non-numbers
    return parse


def _synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    parser.add_argument("--slides", type=_int_at_least(1), default=12, help="number of slides")
    parser.add_argument("--size", type=_int_at_least(writing.MIN_SIZE), default=2048,
                        help=f"nominal slide side in pixels (>= {writing.MIN_SIZE}; each side is "
                             "92-100%% of it)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same args => same bytes)")
    parser.add_argument("--layout", choices=layouts.LAYOUTS, default="classic",
                        help="classic: tumour bodies among strands and debris (the first generator); "
                             "sections: tumour inside large sections with stroma, normal tissue and "
                             "inflammation (harder)")
    parser.add_argument("--write-tissue-masks", action="store_true",
                        help="also write the true tissue masks and a tissue_mask manifest column")


def _tile_arguments(parser: argparse.ArgumentParser) -> None:
    positive = _int_at_least(1)
    parser.add_argument("--manifest", required=True, type=pathlib.Path, help="slide manifest CSV")
    parser.add_argument("--out", required=True,
                        help="output dataset folder (DATA_DIR): a local path, or a URL that fsspec writes "
                             "(gs://BUCKET/data needs `pip install gcsfs`)")
    parser.add_argument("--patch-size", required=True, type=positive, help="patch side P in pixels")
    parser.add_argument("--stride", type=positive, default=None, help="grid stride S (default P)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level to tile")
    parser.add_argument("--downsample", type=positive, default=None,
                        help="tile at this downsample of level 0 (pyramid level or area mean)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="tile every slide at this many microns per pixel: the nearest pyramid level at or "
                             "finer than it, resampled by area (the slide's pixel size from the manifest's mpp "
                             "column or the file)")
    parser.add_argument("--channels", type=cli.comma_names, default=None, metavar="NAME,NAME,...",
                        help="tile these channels, by name (the manifest's channel_names or the OME names), in "
                             "this order")
    parser.add_argument("--tumour-classes", "--tumor-classes", type=cli.comma_names, default=None, metavar="NAME,...",
                        help="QuPath classes of the manifest's annotations that are tumour (e.g. Tumor)")
    parser.add_argument("--tissue-classes", type=cli.comma_names, default=None, metavar="NAME,...",
                        help="QuPath classes of the annotations that are tissue (default: detect tissue)")
    parser.add_argument("--reader", choices=("auto", "tifffile", "openslide"), default="auto",
                        help="image backend: tifffile, or OpenSlide (the 'openslide' extra) for formats "
                             "tifffile cannot read; auto picks OpenSlide for .mrxs, .vms and .vmu")
    parser.add_argument("--workers", type=positive, default=1,
                        help="worker processes (with --runner beam: of Beam's local DirectRunner)")
    # tile_manifest.RUNNERS, which checks the value (importing it here would load the tiler for --help)
    parser.add_argument("--runner", default="local", metavar="{local,beam}",
                        help="run the slides in a local process pool, or as an Apache Beam pipeline "
                             "(one element per slide; needs the 'beam' extra)")
    parser.add_argument("--beam-option", dest="beam_options", action="append", default=[], metavar="--NAME=VALUE",
                        help="a Beam pipeline option for --runner beam, written with '=' "
                             "(--beam-option=--runner=DataflowRunner); repeat for several")
    parser.add_argument("--skip-errors", action="store_true",
                        help="skip broken slides, publish the others and report the broken ones "
                             "(exit status 2 if any slide failed)")
    parser.add_argument("--min-tumour-pixels", "--min-tumor-pixels", type=positive, default=1,
                        help="tumour pixels that make a patch label 1 (--min-tumor-pixels: the first "
                             "version's spelling, still accepted)")
    parser.add_argument("--min-tissue-ratio", type=float, default=0.0,
                        help="keep patches whose tissue ratio is above this")
    parser.add_argument("--tissue-polarity", choices=("auto", "dark", "bright"), default="auto",
                        help="background of the tissue detection")
    parser.add_argument("--tissue-factor", type=positive, default=None,
                        help=f"tissue detection at 1/F of the tiled level (default: the smallest power "
                             f"of 2 giving a long side <= {THUMBNAIL_SIDE} px)")
    parser.add_argument("--tumour-ids", type=int, nargs="+", default=None,
                        help="mask labels that are tumour (for label-map masks)")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2),
                        metavar=("TRAIN", "VALIDATION", "TEST"),
                        help="split by patient with these fractions when the manifest has no split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=pathlib.Path, help="tiled dataset (DATA_DIR)")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.03, 0.1, 0.2],
                        help="tissue-ratio thresholds, each giving a = 1[r >= tau]")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="PNG of the tissue-ratio distribution (default DATA_DIR/tissue_ratio.png)")


ARGUMENTS = {"synthetic": _synthetic_arguments, "tile": _tile_arguments, "stats": _stats_arguments}
