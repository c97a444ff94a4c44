"""`gerne-jax predict`: whole slides through a trained run, into maps, overlays, QuPath regions and metrics.

  gerne-jax predict --workdir runs/gerne --manifest slides.csv --out runs/gerne/predict
                    [--checkpoint best_wga|best_bca|latest|STEP] [--stride S] [--batch-size N]
                    [--workers W] [--threshold T] [--tau 0.03 0.1 0.2] [--split test] [--skip-errors]
                    [--shard I/N]
  gerne-jax predict --workdir runs/gerne --slide slide.ome.tif [--mask mask.tif | --annotations a.geojson]
                    [--slide-id ID] [--mpp M] [--channel-names A,B,C] --out runs/gerne/predict_one

The manifest has the tiler's format (`mask` optional: without one a slide is predicted, not scored);
`--slide` predicts one slide as a one-row manifest would (its id by default the file name without its
extension). Slides are read with the run's data settings (the tiling settings, channels and normalisation
recorded in the run's data_spec.json when it was trained), so the patches and probabilities are those
`gerne-jax evaluate` sees for a tiled slide, and the run predicts without its training data. Per
slide, OUT/slides/<id>/ holds probability.tif, overlay.png, patches.csv, regions.geojson and
summary.json; OUT/slides.csv, OUT/index.md and, with masks, OUT/metrics.json and
OUT/error_vs_tissue_ratio.png cover the run. Run it again to resume: finished slides are skipped.

Several processes or hosts share one manifest and OUT: with `--shard I/N` (e.g. a SLURM array:
`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`) each predicts every N-th slide, on its own,
and rewrites the run's files with the slides finished so far (others "pending"): the last shard to finish
writes the complete ones. The processes of one JAX run (`--coordinator-address host:port --num-processes N
--process-id I`, or srun / mpirun / a TPU pod slice detected, as for train and evaluate) share the slides
the same way, each on its own devices, and process 0 writes the run's files once all are done.
"""
from __future__ import annotations

import argparse

from gerne_jax.commands.evaluate import CHECKPOINT_HELP, LAUNCH_FLAGS, add_launch_flags
from gerne_jax.core import cli
from gerne_jax.core.errors import InputError
from gerne_jax.data import dataset

# The flags that describe the one slide of --slide, beside it.
SLIDE_FLAGS = {"--mask": "its tumour mask (then its patches are scored)",
               "--annotations": "its QuPath GeoJSON annotations, instead of a mask",
               "--slide-id": "its id (default: the file name without its extension, `.ome.tif` counting as one)",
               "--mpp": "microns per level-0 pixel, overriding what the file states",
               "--channel-names": "its channels' names, separated by commas"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments; a bad combination is an InputError (`_check_inputs`)."""
    parser = argparse.ArgumentParser(prog="gerne-jax predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a folder written by `gerne-jax train`")
    parser.add_argument("--checkpoint", default="best_wga", help=CHECKPOINT_HELP)
    parser.add_argument("--manifest", default=None,
                        help="slide manifest CSV (the tiler's format, mask optional); or --slide")
    parser.add_argument("--out", required=True, help="output folder")
    one = parser.add_argument_group("one slide, instead of --manifest")
    one.add_argument("--slide", default=None, help="the slide's image file")
    for flag, text in SLIDE_FLAGS.items():
        one.add_argument(flag, default=None, help=text)
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
    parser.add_argument("--tumour-classes", "--tumor-classes", type=cli.comma_names, default=None, metavar="NAME,...",
                        help="QuPath classes of the slides' annotations that are tumour (default: the data's)")
    parser.add_argument("--tissue-classes", type=cli.comma_names, default=None, metavar="NAME,...",
                        help="QuPath classes of the annotations that are tissue (default: the data's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="patches per device batch (default: the run's data.eval_batch_size)")
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="tumour probability at which the map's regions are drawn")
    parser.add_argument("--tau", type=float, nargs="+", default=None,
                        help="tissue-ratio thresholds of the metrics, each on its own (default: the run's)")
    parser.add_argument("--skip-errors", action="store_true",
                        help="skip broken slides, finish the others, list the failures (exit status 2)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="predict only the slides at manifest positions I, I + N, I + 2N, ... (0 <= I < N), "
                             "beside the other shards writing into the same --out")
    add_launch_flags(parser.add_argument_group("several processes of one JAX run (docs/scaling.md)"))
    args = parser.parse_args(argv)
    _check_inputs(args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Predict whole slides with a trained run: probability maps, overlays, QuPath regions, slide metrics."""
    args = parse_args(argv)
    from gerne_jax.core import distributed
    from gerne_jax.evaluation import reports
    from gerne_jax.predict import inference, prediction, run_data

    # Bad input is answered before the run is restored or a process waits for the others.
    shard = prediction.Shard.parse(args.shard) if args.shard is not None else None
    spec = None if args.slide is None else prediction.single_slide(
        args.slide, mask=args.mask, annotations=args.annotations, slide_id=args.slide_id, mpp=args.mpp,
        channel_names=args.channel_names)
    distributed.initialize(args.distributed, args.coordinator_address, args.num_processes, args.process_id,
                           names=LAUNCH_FLAGS)
    cli.setup_logging(main_process=distributed.is_main_process())
    run = inference.load_run(args.workdir, args.checkpoint, args.data_dir)
    tiling = run_data.data_tiling_config(run, stride=args.stride, min_tissue_ratio=args.min_tissue_ratio,
                                         tissue_polarity=args.tissue_polarity, tumour_classes=args.tumour_classes,
                                         tissue_classes=args.tissue_classes)
    taus_list = tuple((t,) for t in args.tau) if args.tau else (tuple(run.config.data.taus),)
    settings = run_data.PredictionSettings(
        tiling=tiling, threshold=args.threshold, taus_list=taus_list,
        batch_size=args.batch_size or run.config.data.eval_batch_size, workers=args.workers)
    options = {"skip_errors": args.skip_errors, "shard": shard}
    result = (prediction.predict_slides(run, [spec], args.out, settings, **options) if spec is not None else
              prediction.predict_manifest(run, args.manifest, args.out, settings, split=args.split, **options))
    if result is None:  # a process other than 0 of a multi-process run: process 0 reports
        return 0
    for key, report in result["pooled"].items():
        print(f"\n=== pooled over the slides with masks, {key}, checkpoint {args.checkpoint} ===")
        print(reports.group_table(report))
    print(f"\nwrote {args.out}/index.md, slides.csv and one folder per slide under {args.out}/slides")
    if result["failed"]:
        raise InputError(f"{len(result['failed'])} of {len(result['slides'])} slide(s) failed "
                         f"(listed above and in {args.out}/slides.csv); the others are written")
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    """Exactly one of --manifest and --slide, and the flags of --slide only with it (one-line InputErrors)."""
    if (args.manifest is None) == (args.slide is None):
        raise InputError("give exactly one of --manifest (a slide manifest CSV) and --slide (one slide's image), "
                         + ("not both" if args.manifest is not None else "found neither"))
    if args.slide is None:
        given = [flag for flag in SLIDE_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            raise InputError(f"{', '.join(given)} describe(s) the slide of --slide; a manifest names its slides' "
                             "files in its columns")
    elif args.split is not None:
        raise InputError("--split chooses among a manifest's slides; it does not apply to --slide")
