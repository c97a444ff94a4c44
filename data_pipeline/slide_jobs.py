"""The slides left to tile, as jobs: one slide's job (`tile_job`) and the local runner of many.

A `SlideRunner` runs `tile_job` for each slide left to do and yields its results; `tile_manifest`
does everything before and after the slides, the same whatever ran them. Two runners exist:
`run_local` here (a pool of worker processes, with progress bars) and
`data_pipeline.beam_runner.run_slides` (an Apache Beam pipeline, one element per slide).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.managers
import pathlib
import queue
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from data_pipeline import parent_watch, storage
from data_pipeline.tiling import WORK_DIR, slide_paths, tile_slide
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.scan import SlideFormat, TilingConfig

# What runs the slides left to do: (jobs, data_dir, config, dataset format, their grid positions for
# progress) -> one `tile_job` result per job, in any order.
SlideRunner = Callable[[Sequence[SlideSpec], storage.AnyPath, TilingConfig, SlideFormat, int],
                       Iterable[dict[str, Any]]]


def tile_job(spec: SlideSpec, data_dir: storage.AnyPath, config: TilingConfig, expected: SlideFormat,
             progress: Callable[[int], None]) -> dict[str, Any]:
    """Runs `tile_slide` and turns its failure into a result, so the parent decides what to do.

    A result is `{"slide_id", "status": "tiled", "sidecar"}` or `{"slide_id", "status": "failed",
    "error": one line, "exception": what the parent raises without --skip-errors}`; both runners
    (`run_local`, `beam_runner.run_slides`) yield these."""
    try:
        sidecar = _tile_slide_to(spec, data_dir, config, expected, progress)
    except SlideError as error:
        return {"slide_id": spec.slide_id, "status": "failed", "error": str(error), "exception": error}
    except Exception as error:  # noqa: BLE001 - reported, and re-raised without --skip-errors
        return {"slide_id": spec.slide_id, "status": "failed", "error": f"{type(error).__name__}: {error}",
                "exception": RuntimeError(f"slide {spec.slide_id!r}: unexpected error\n"
                                          f"{traceback.format_exc()}")}
    return {"slide_id": spec.slide_id, "status": "tiled", "sidecar": sidecar}


def _tile_slide_to(spec: SlideSpec, data_dir: storage.AnyPath, config: TilingConfig, expected: SlideFormat,
                   progress: Callable[[int], None]) -> dict[str, Any]:
    """`tile_slide` into `data_dir`. At a URL: into a local temporary folder (the array_record and PNG
    writers need local files), then uploaded, each file whole, the sidecar last as it marks the
    slide finished."""
    if isinstance(data_dir, pathlib.Path):
        return tile_slide(spec, data_dir, config, expected, progress)
    with tempfile.TemporaryDirectory(prefix=f"tile-{spec.slide_id}-") as local:
        (pathlib.Path(local) / WORK_DIR).mkdir()
        sidecar = tile_slide(spec, pathlib.Path(local), config, expected, progress)
        written, remote = slide_paths(pathlib.Path(local), spec.slide_id), slide_paths(data_dir, spec.slide_id)
        for key in ("records", "qc", "sidecar"):
            storage.upload(written[key], remote[key])
    return sidecar


class _QueueProgress:
    """Picklable progress callback of a worker process: sends counts to the parent's queue."""

    def __init__(self, progress_queue):
        self.progress_queue = progress_queue

    def __call__(self, positions: int) -> None:
        self.progress_queue.put(positions)


def run_local(jobs: Sequence[SlideSpec], data_dir: storage.AnyPath, config: TilingConfig,
              expected: SlideFormat, total_positions: int, *, workers: int,
              show_progress: bool) -> Iterator[dict[str, Any]]:
    """The local `SlideRunner`: yields one result per job as slides finish, with progress bars.
    Closing the generator (the caller stopping on an error) cancels the slides not started yet."""
    slide_bar = tqdm(total=len(jobs), desc="slides", unit="slide", position=0, disable=not show_progress)
    patch_bar = tqdm(total=total_positions, desc="grid positions", unit="pos", position=1,
                     disable=not show_progress, smoothing=0.05)
    try:
        if workers == 1 or len(jobs) <= 1:
            for spec in jobs:
                result = tile_job(spec, data_dir, config, expected, patch_bar.update)
                slide_bar.update()
                yield result
            return
        context = multiprocessing.get_context("spawn")
        # The manager's server and the workers end when this process dies, even by SIGKILL (which runs no
        # clean-up here): else they, and multiprocessing's resource tracker, would wait forever on it.
        watch = parent_watch.initargs()
        manager = multiprocessing.managers.SyncManager(ctx=context)
        manager.start(parent_watch.exit_with, watch)
        with manager, concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=context,
                initializer=parent_watch.exit_with, initargs=watch) as executor:
            progress_queue = manager.Queue()
            pending = set()
            try:
                pending = {executor.submit(tile_job, spec, data_dir, config, expected,
                                           _QueueProgress(progress_queue)) for spec in jobs}
                while pending:
                    done, pending = concurrent.futures.wait(
                        pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
                    _drain(progress_queue, patch_bar)
                    for future in done:
                        slide_bar.update()
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        patch_bar.close()
        slide_bar.close()


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return
