"""Whole-slide prediction: the slides of a manifest (or one slide) through a trained run, by one process or
shared among several -> maps, regions, metrics.

Each slide goes through the three steps of `slide_prediction` (open, scan, write). Over a list of slides
the steps are pipelined (`_predict_slides`): the next slide is opened and the last one written while the
model works on the current one. Slides already finished (their `summary.json` written with the same run,
checkpoint, settings and files) are skipped; a slide that fails under `skip_errors` is recorded on disk
(`run_outputs.record_failure`). Per slide, the files of `slide_prediction.write_slide` go under
`OUT/slides/<slide_id>/`; for the run, `run_outputs.write` rebuilds `OUT/slides.csv`, `OUT/index.md` and,
where masks exist, `OUT/metrics.json` and `OUT/error_vs_tissue_ratio.png` from what is on disk.

Shares. Several processes predict one manifest into one OUT, each its share (`Shard` I/N: the slides at
manifest positions congruent to I mod N), without talking to each other: each holds the lock of its
shard (`OUT/.locks/shard-I-of-N/.lock`, so the same shard does not run twice) instead of `OUT/.lock`,
and after its slides rewrites the run outputs from the state of every slide on disk, listing the slides
of unfinished shards as "pending"; the last shard to finish writes the outputs one process would have.
The processes of a multi-process JAX run (`gerne_jax.core.distributed`) take shard `process_index /
process_count` each; each classifies on its own devices only (`local_classifier`: the processes hold
different slides and run different numbers of batches, so a batch must not be a collective over all
of them), all meet at a barrier of the distributed runtime when done (`distributed.meet`), and process 0 writes
the run outputs.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import tqdm

from gerne_jax.core import cli, distributed, files, sharding
from gerne_jax.core.errors import InputError
from gerne_jax.data import normalisation
from gerne_jax.predict import inference, run_outputs
from gerne_jax.predict.run_data import PredictionSettings
from gerne_jax.predict.slide_prediction import (
    OpenedSlide,
    load_finished,
    open_slide,
    scan_slide,
    start_slide,
    write_slide,
)
from gerne_jax.runs import run_log
from gerne_jax.slides import physical, tiling_report
from gerne_jax.slides.manifest import SlideError, SlideSpec, read_manifest


@dataclasses.dataclass(frozen=True)
class Shard:
    """One process's share of the slides: those at manifest positions congruent to `index` mod `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` with 0 <= I < N (`--shard`); anything else is an InputError naming it."""
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if match is None or not 0 <= int(match[1]) < int(match[2]):
            raise InputError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (a SLURM array of N tasks "
                             "numbered from 0: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, specs: Sequence[SlideSpec]) -> list[SlideSpec]:
        return list(specs[self.index::self.count])


def default_slide_id(image: str | os.PathLike) -> str:
    """A slide's file name without its extension; `.ome.tif(f)` counts as one (`a.ome.tif` -> `a`)."""
    name = pathlib.Path(image).name
    stem = re.sub(r"\.ome\.tiff?$", "", name, flags=re.IGNORECASE)
    return stem if stem != name else pathlib.Path(name).stem


def single_slide(image: str | os.PathLike, *, mask: str | os.PathLike | None = None,
                 annotations: str | os.PathLike | None = None, slide_id: str | None = None, mpp: str | None = None,
                 channel_names: str | None = None) -> SlideSpec:
    """The one-slide `SlideSpec` of `predict --slide` (its id by default `default_slide_id`), checked as a
    manifest row is: its files exist, at most one of mask and annotations, `mpp` a positive number and
    `channel_names` (comma-separated) distinct. A problem is a SlideError naming the flag."""
    slide_id = default_slide_id(image) if slide_id is None else slide_id.strip()
    if not slide_id:
        raise InputError("--slide-id is empty")

    def existing(path: str | os.PathLike | None, flag: str) -> pathlib.Path | None:
        if path is None:
            return None
        file = pathlib.Path(path).expanduser().absolute()
        if not file.is_file():
            raise SlideError(slide_id, file, f"file not found ({flag})")
        return file

    if mask is not None and annotations is not None:
        raise SlideError(slide_id, None, "give --mask or --annotations, not both")
    names = None if channel_names is None else cli.comma_names(channel_names)
    if names is not None and (not all(names) or len(set(names)) != len(names)):
        raise SlideError(slide_id, None, f"--channel-names {channel_names!r}: expected distinct, non-empty "
                                         "names separated by commas")
    value = None if mpp is None else physical.positive_mpp(mpp)
    if mpp is not None and value is None:
        raise SlideError(slide_id, None, f"--mpp must be a positive number of microns per pixel, got {mpp!r}")
    return SlideSpec(slide_id=slide_id, image_files=(existing(image, "--slide"),), mask_file=existing(mask, "--mask"),
                     annotations_file=existing(annotations, "--annotations"), channel_names=names, mpp=value)


def slides_of_split(specs: Sequence[SlideSpec], data_spec: run_log.DataSpec, split: str) -> list[SlideSpec]:
    """The slides that went into `split` of the run's data (its tiling report, stored in the run's data
    spec), else those of the manifest's `split` column."""
    chosen = [spec for spec in specs if (data_spec.slide_splits.get(spec.slide_id) or spec.split) == split]
    if not chosen:
        raise InputError(f"no slide of the manifest is in the {split!r} split of the run's data (by the "
                         f"{tiling_report.FILE_NAME} splits in {data_spec.source}, or the manifest's split column)")
    return chosen


def predict_manifest(run: inference.RestoredRun, manifest: str | os.PathLike, out: str | os.PathLike,
                     settings: PredictionSettings, *, split: str | None = None, skip_errors: bool = False,
                     shard: Shard | None = None, show_progress: bool = True) -> dict[str, Any] | None:
    """Predicts every slide of `manifest` (or those of `split`, `slides_of_split`) into `out`: `predict_slides`."""
    specs = read_manifest(manifest, require_mask=False)
    if split is not None:
        specs = slides_of_split(specs, run.data_spec, split)
    return predict_slides(run, specs, out, settings, skip_errors=skip_errors, shard=shard, show_progress=show_progress)


def predict_slides(run: inference.RestoredRun, specs: Sequence[SlideSpec], out: str | os.PathLike,
                   settings: PredictionSettings, *, skip_errors: bool = False, shard: Shard | None = None,
                   show_progress: bool = True) -> dict[str, Any] | None:
    """Predicts `specs`, or this process's `shard` of them, into `out` and writes the run outputs (module
    docstring); in a multi-process JAX run each process takes its share and process 0 writes them.

    A broken slide raises its SlideError, unless `skip_errors`: then the others finish and the failures are
    listed in `slides.csv`. Returns `{"slides": slides.csv's rows, "pooled": per-tau metrics, "failed": the
    failed slides of this job (its shard, or all slides), "pending": slides other shards have still to do,
    "resumed": the slides this process found finished}`; None in the processes other than 0 of a
    multi-process run, which write no run outputs.
    """
    out = pathlib.Path(out)
    processes = jax.process_count()
    if processes > 1:
        if shard is not None:
            raise InputError(f"--shard {shard} in a run of {processes} JAX processes, which share the slides "
                             "themselves (process i of n predicts shard i/n): give one or the other")
        shard = Shard(jax.process_index(), processes)
    share = shard.take(specs) if shard is not None else list(specs)
    classifier = local_classifier(run, settings.batch_size)
    lock_folder, what = ((out, "prediction") if shard is None else
                         (out / run_outputs.LOCKS_DIR / f"shard-{shard.index}-of-{shard.count}",
                          f"prediction, shard {shard}"))
    predict = functools.partial(_predict_share, share, run, classifier, settings, out, skip_errors, show_progress)
    if processes == 1:
        with files.exclusive_lock(lock_folder, what):
            resumed = predict()
    else:
        resumed = _predict_together(lock_folder, what, predict)
        if jax.process_index() != 0:
            return None
    with run_outputs.lock(out):
        written = run_outputs.write(out, specs, run, settings)
    job = {spec.slide_id for spec in (share if processes == 1 else specs)}
    pending = [row["slide_id"] for row in written["slides"] if row["status"] == "pending"]
    if pending:
        print(f"{len(pending)} slide(s) pending in other shards: the last shard to finish writes the complete "
              f"{out}/slides.csv, index.md and metrics")
    return {**written, "failed": sorted(row["slide_id"] for row in written["slides"]
                                        if row["status"] == "failed" and row["slide_id"] in job),
            "pending": pending, "resumed": resumed}


def local_classifier(run: inference.RestoredRun, batch_size: int) -> inference.PatchClassifier:
    """The run's classifier (`inference.PatchClassifier`) on this process's devices alone.

    In one process, that is the run's own mesh. In a multi-process run the run's variables are replicated
    over every process's devices, so each process holds a whole copy, which it places on a mesh of its
    local devices.
    """
    if jax.process_count() == 1:
        return inference.PatchClassifier.from_run(run, batch_size)
    mesh = sharding.local_mesh()
    replicated = sharding.replicated_sharding(mesh)

    def local(tree: Any) -> Any:
        return jax.tree.map(lambda leaf: jax.device_put(leaf.addressable_data(0), replicated), tree)

    model = dataclasses.replace(run.model, params=local(run.model.params), batch_stats=local(run.model.batch_stats))
    return inference.PatchClassifier(model, mesh, normalisation.Standardiser.of(run.metadata, mesh), batch_size)


def _predict_together(lock_folder: pathlib.Path, what: str, predict: Callable[[], list[str]]) -> list[str]:
    """`predict()` in each process of a multi-process run under its shard's lock, all processes stopping
    together: when one cannot take its lock or fails, all raise once each has reached the barrier."""
    with contextlib.ExitStack() as stack:
        error: Exception | None = None
        try:
            stack.enter_context(files.exclusive_lock(lock_folder, what))
        except InputError as failure:
            error = failure
        distributed.meet("predict-locked", error)
        resumed: list[str] = []
        try:
            resumed = predict()
        except Exception as failure:  # noqa: BLE001 - raised below, once every process knows
            error = failure
        distributed.meet("predict-predicted", error)
    return resumed


def _predict_share(share: Sequence[SlideSpec], run: inference.RestoredRun, classifier: inference.PatchClassifier,
                   settings: PredictionSettings, out: pathlib.Path, skip_errors: bool,
                   show_progress: bool) -> list[str]:
    """Predicts the slides of `share` not finished yet; returns the ids of those already finished."""
    finished = {spec.slide_id for spec in share if load_finished(spec, run, settings, out) is not None}
    todo = [spec for spec in share if spec.slide_id not in finished]
    if finished:
        print(f"resuming: {len(finished)} slide(s) already predicted, {len(todo)} to go")
    slide_bar = tqdm.tqdm(total=len(todo), desc="slides", unit="slide", position=0, disable=not show_progress)
    patch_bar = tqdm.tqdm(desc="grid positions", unit="pos", position=1, disable=not show_progress, smoothing=0.05)
    try:
        failures = _predict_slides(todo, run, classifier, settings, out, skip_errors, slide_bar, patch_bar)
    finally:
        patch_bar.close()
        slide_bar.close()
    if failures:
        print(f"{len(failures)} slide(s) failed and were skipped:", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
    return [spec.slide_id for spec in share if spec.slide_id in finished]


def _predict_slides(todo: Sequence[SlideSpec], run: inference.RestoredRun, classifier: inference.PatchClassifier,
                    settings: PredictionSettings, out: pathlib.Path, skip_errors: bool,
                    slide_bar: tqdm.tqdm, patch_bar: tqdm.tqdm) -> list[str]:
    """Opens, scans and writes every slide of `todo`, pipelined: while slide k is scanned (the model's
    time), slide k + 1 is opened (thumbnail, tissue detection) on one thread and slide k - 1 written
    (tables, map, overlay) on another, so the model does not wait for a slide's fixed costs. Each slide's
    summary is still written last; an error stops the run after the slide being written is finished.
    Returns the messages of the slides that failed (`skip_errors`), each also recorded on disk."""
    failures: list[str] = []

    def opening(spec: SlideSpec) -> OpenedSlide:
        start_slide(spec, out)
        run_outputs.clear_failure(out, spec.slide_id)
        return open_slide(spec, run, settings)

    def finish(summary: concurrent.futures.Future) -> None:
        summary.result()
        slide_bar.update()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="open-slide") as opener, \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="write-slide") as writer:
        upcoming = opener.submit(opening, todo[0]) if todo else None
        writing = None  # the future summary of the slide being written
        try:
            for k, spec in enumerate(todo):
                slide_bar.set_postfix_str(spec.slide_id)
                current = upcoming
                upcoming = opener.submit(opening, todo[k + 1]) if k + 1 < len(todo) else None
                try:
                    opened = current.result()
                    try:
                        scanned = scan_slide(opened, classifier, settings, patch_bar.update)
                    finally:
                        opened.close()
                except SlideError as error:
                    if not skip_errors:
                        raise
                    run_outputs.record_failure(out, spec.slide_id, str(error))
                    failures.append(str(error))
                    slide_bar.update()
                    continue
                if writing is not None:
                    finish(writing)
                writing = writer.submit(write_slide, scanned, run, settings, out)
            if writing is not None:
                finish(writing)
        finally:
            if upcoming is not None and not upcoming.cancel():  # opened ahead of a run that stopped
                try:
                    upcoming.result().close()
                except BaseException:  # noqa: BLE001 - its own error is not this run's
                    pass
    return failures

