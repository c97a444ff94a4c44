"""`gerne-jax predict`: whole slides through a trained run, into maps, overlays, QuPath regions and metrics.

  gerne-jax predict --workdir runs/gerne --manifest slides.csv --out runs/gerne/predict
                    [--checkpoint best_wga|best_bca|latest|STEP] [--stride S] [--batch-size N]
                    [--workers W] [--threshold T] [--tau 0.03 0.1 0.2] [--split test] [--skip-errors]

The manifest has the tiler's format (`mask` optional: without one a slide is predicted, not scored).
Slides are read with the run's data settings (the tiling settings, channels and normalisation recorded
in the run's data_spec.json when it was trained), so the patches and probabilities are those
`gerne-jax evaluate` sees for a tiled slide, and the run predicts without its training data. Per
slide, OUT/slides/<id>/ holds probability.tif, overlay.png, patches.csv, regions.geojson and
summary.json; OUT/slides.csv, OUT/index.md and, with masks, OUT/metrics.json and
OUT/error_vs_tissue_ratio.png cover the run. Run it again to resume: finished slides are skipped.
"""
from __future__ import annotations

import argparse

from gerne_jax.commands.evaluate import CHECKPOINT_HELP
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gerne-jax predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a folder written by `gerne-jax train`")
    parser.add_argument("--checkpoint", default="best_wga", help=CHECKPOINT_HELP)
    parser.add_argument("--manifest", required=True, help="slide manifest CSV (the tiler's format, mask optional)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default=None, choices=dataset.SPLITS,
                        help="only the manifest's slides of this split of the run's data (its tiling report, "
                             "stored in the run), e.g. the test slides of the manifest the data was tiled from")
    # A run trained before runs stored their data_spec.json reads its DATA_DIR instead (data settings and
    # --split), as it always did: --data-dir points it there if the data moved. Newer runs ignore it.
    parser.add_argument("--data-dir", default=None,
                        help="the DATA_DIR of a run trained before runs stored their data_spec.json, if it moved "
                             "(its data settings and --split's slide splits are read there); ignored for "
                             "newer runs, which hold them")
    parser.add_argument("--stride", type=int, default=None,
                        help="grid stride in pixels of the predicted level (default: the data's); "
                             "below the patch size, overlapping patches are averaged")
    parser.add_argument("--min-tissue-ratio", type=float, default=None,
                        help="classify patches whose tissue ratio is above this (default: the data's)")
    parser.add_argument("--tissue-polarity", choices=("auto", "dark", "bright"), default=None,
                        help="background of the tissue detection (default: the data's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="patches per device batch (default: the run's data.eval_batch_size)")
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="tumour probability at which the map's regions are drawn")
    parser.add_argument("--tau", type=float, nargs="+", default=None,
                        help="tissue-ratio thresholds of the metrics, each on its own (default: the run's)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="skip broken slides, finish the others, list the failures (exit status 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Predict whole slides with a trained run: probability maps, overlays, QuPath regions, slide metrics."""
    args = parse_args(argv)
    from gerne_jax.core import cli
    from gerne_jax.evaluation import reports
    from gerne_jax.predict import inference, prediction, run_data

    cli.setup_logging()
    run = inference.load_run(args.workdir, args.checkpoint, args.data_dir)
    tiling = run_data.data_tiling_config(run, stride=args.stride, min_tissue_ratio=args.min_tissue_ratio,
                                         tissue_polarity=args.tissue_polarity)
    taus_list = tuple((t,) for t in args.tau) if args.tau else (tuple(run.config.data.taus),)
    settings = run_data.PredictionSettings(
        tiling=tiling, threshold=args.threshold, taus_list=taus_list,
        batch_size=args.batch_size or run.config.data.eval_batch_size, workers=args.workers)
    result = prediction.predict_manifest(run, args.manifest, args.out, settings, split=args.split,
                                         skip_errors=args.skip_errors)
    for key, report in result["pooled"].items():
        print(f"\n=== pooled over the slides with masks, {key}, checkpoint {args.checkpoint} ===")
        print(reports.group_table(report))
    print(f"\nwrote {args.out}/index.md, slides.csv and one folder per slide under {args.out}/slides")
    if result["failed"]:
        raise InputError(f"{len(result['failed'])} of {len(result['slides'])} slide(s) failed "
                         f"(listed above and in {args.out}/slides.csv); the others are written")
    return 0
