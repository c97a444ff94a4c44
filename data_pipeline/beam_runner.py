"""`gerne-jax tile --runner beam`: the slides left to tile, run as an Apache Beam pipeline.

`tile_manifest` does everything before and after the slides, the same for both runners: manifest and
splits, the header pass and dataset format, resume, failures, the report and publishing. This module
is only its `slide_jobs.SlideRunner` on Beam:

    Create(one element per slide; Beam reshuffles them, so the runner spreads them over its workers)
    | ParDo(slide_jobs.tile_job: tiling.tile_slide -> the slide's array_record, QC PNG and sidecar,
             then its result: a JSON file DATA_DIR/.work/beam/<slide_id>.json, tiled or failed with its error)

When the pipeline has finished, the launching process reads the results, and each tiled slide's
sidecar from DATA_DIR, and yields the same results as the local pool; the DATA_DIR published from
them is byte-identical to the local runner's.

Storage: the workers write DATA_DIR themselves, through `data_pipeline.storage`: a local folder
(then the workers and the launching process must share it at the same absolute path: one machine,
or a cluster's shared POSIX file system), or a URL that fsspec writes (gs://, s3://, ...), which
every machine reaches alike; a worker tiles a slide into its local temporary folder and uploads the
files. The manifest's slides are read as local files, at the same absolute paths on every worker.

Failures: `tile_job` turns a slide's error into a result, so a broken slide never fails its bundle
(a runner would retry it and then fail the whole job); the launching process raises it, or reports
it with --skip-errors, exactly as for the local pool. A bundle that a runner retries (a lost worker)
rewrites the same files, each write atomic.
Progress: the grid positions scanned are the Beam counter `tiling/grid_positions`, which runners
such as Dataflow show while the job runs; locally a bar counts slides as their sidecars appear.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from tqdm import tqdm

from data_pipeline import parent_watch, storage
from data_pipeline.slide_jobs import SlideRunner, tile_job
from data_pipeline.tiling import WORK_DIR, load_finished, slide_paths
from gerne_jax.core.errors import InputError
from gerne_jax.slides.manifest import SlideError, SlideSpec
from gerne_jax.slides.scan import SlideFormat, TilingConfig

RESULTS_DIR = "beam"      # under DATA_DIR/.work: one result file per slide, removed once read
PROGRESS_INTERVAL_S = 1.0
README_SECTION = "docs/scaling.md, 'Tiling on Apache Beam'"
LOCAL_LOG_LEVEL = ("--default_sdk_harness_log_level=ERROR",)


def pipeline_options(flags: Sequence[str], workers: int) -> PipelineOptions:
    """The Beam pipeline options of `flags` (`--beam-option` values). Without a `--runner` among them:
    Beam's DirectRunner on `workers` local processes. A malformed, unknown or badly typed option
    raises InputError naming it, so that a typo never runs the job somewhere else than meant."""
    for flag in flags:
        if not flag.startswith("--") or flag == "--":
            raise InputError(f"--beam-option {flag!r}: a Beam pipeline option is written --NAME=VALUE or "
                             "--NAME, and passed as --beam-option=--NAME=VALUE")
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its whole usage before the error
            # The user's flags come last, so that theirs win over these defaults. Local workers log
            # errors only: their start-up warnings would interleave with the progress bar on every run.
            local = runs_on_this_machine(PipelineOptions(flags))
            options = PipelineOptions(["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}",
                                       *(LOCAL_LOG_LEVEL if local else ()), *flags])
            known = options.get_all_options()
            unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    except SystemExit as exit_:  # argparse rejected a value; its last line says which
        problem = usage.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise InputError(f"--beam-option: {problem} (in {list(flags)})") from exit_
    if unknown:
        raise InputError(f"--beam-option: unknown Beam pipeline option(s) {['--' + name for name in unknown]} "
                         f"in {list(flags)}")
    return options


def runs_on_this_machine(options: PipelineOptions) -> bool:
    """Whether the options choose Beam's DirectRunner (the default), whose workers are local processes."""
    return options.get_all_options()["runner"] in (None, "DirectRunner")


def _pipeline(options: PipelineOptions) -> beam.Pipeline:
    """The pipeline of `options`; on this machine it runs on Beam's FnApiRunner (local worker processes).

    Beam's DirectRunner would first try its Prism runner, which downloads a binary from GitHub: network
    at run time, and without network a failed attempt that leaves a temporary folder behind before it
    falls back to the FnApiRunner. This is the runner it falls back to, built the way it builds it.
    """
    if not runs_on_this_machine(options):
        return beam.Pipeline(options=options)
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision), options=options)


def slide_runner(flags: Sequence[str], workers: int, show_progress: bool) -> SlideRunner:
    """`run_slides` with checked pipeline options, as `tile_manifest` calls a runner."""
    return functools.partial(run_slides, options=pipeline_options(flags, workers), show_progress=show_progress)


class _TileSlide(beam.DoFn):
    """One slide per element: `tile_job`'s result written as a JSON file (its sidecar stays in DATA_DIR).
    A retried bundle rewrites the same file, whole."""

    def __init__(self, data_dir: storage.AnyPath, config: TilingConfig, expected: SlideFormat,
                 launcher_pid: int | None):
        self._data_dir, self._config, self._expected = data_dir, config, expected
        self._launcher_pid = launcher_pid
        self._positions = Metrics.counter("tiling", "grid_positions")

    def setup(self) -> None:
        # A local worker process ends once the launching process has died, even by SIGKILL, whether or
        # not Beam's worker notices its lost connection. (A no-op in the launching process itself.)
        if self._launcher_pid is not None:
            parent_watch.exit_with(self._launcher_pid)

    def process(self, spec: SlideSpec) -> Iterable[None]:
        # Outputs nothing: Beam reads the return annotation as the output type and wants an iterable.
        result = tile_job(spec, self._data_dir, self._config, self._expected, self._positions.inc)
        storage.write_text(_result_path(self._data_dir, spec.slide_id), json.dumps(_result_to_json(result)))
        return ()


def _result_path(data_dir: storage.AnyPath, slide_id: str) -> storage.AnyPath:
    return data_dir / WORK_DIR / RESULTS_DIR / f"{slide_id}.json"


def run_slides(jobs: Sequence[SlideSpec], data_dir: storage.AnyPath, config: TilingConfig, expected: SlideFormat,
               total_positions: int, *, options: PipelineOptions, show_progress: bool) -> Iterator[dict[str, Any]]:
    """Tiles `jobs` in one Beam pipeline; then yields `tile_job`'s result for each, in manifest order."""
    del total_positions  # the workers' progress reaches this process only as finished slides
    if not jobs:
        return
    if not runs_on_this_machine(options):
        relative = [str(path) for path in (data_dir, *(spec.mask_file for spec in jobs)) if not path.is_absolute()]
        if relative:
            raise InputError(f"--beam-option=--runner={options.get_all_options()['runner']}: the workers resolve "
                             f"relative paths in their own working directory; give --manifest and --out as "
                             f"absolute paths (relative here: {relative[:3]})")
    results_dir = data_dir / WORK_DIR / RESULTS_DIR
    storage.remove_tree(results_dir)  # left by a killed run
    results_dir.mkdir(parents=True, exist_ok=True)
    for spec in jobs:
        # Not resumable (other settings or files) and about to be rewritten; removed so that the
        # progress bar counts only this run's sidecars.
        slide_paths(data_dir, spec.slide_id)["sidecar"].unlink(missing_ok=True)
    with _sidecar_progress(jobs, data_dir, show_progress), _pipeline(options) as pipeline:
        _ = (pipeline
             | "slides" >> beam.Create(list(jobs))
             | "tile" >> beam.ParDo(_TileSlide(data_dir, config, expected,
                                               os.getpid() if runs_on_this_machine(options) else None)))
    results = {}
    for spec in jobs:
        path = _result_path(data_dir, spec.slide_id)
        results[spec.slide_id] = json.loads(path.read_text()) if path.exists() else None
    storage.remove_tree(results_dir)
    for spec in jobs:
        yield _result_from_json(results[spec.slide_id], spec, data_dir, config)


def _result_to_json(result: dict[str, Any]) -> dict[str, Any]:
    """`tile_job`'s result without its sidecar, the exception as the fields that rebuild it."""
    if result["status"] == "tiled":
        return {"slide_id": result["slide_id"], "status": "tiled"}
    error = result["exception"]
    if isinstance(error, SlideError):
        return {"slide_id": result["slide_id"], "status": "failed", "file": error.file, "problem": error.problem}
    return {"slide_id": result["slide_id"], "status": "failed", "error": result["error"], "unexpected": str(error)}


def _result_from_json(result: dict[str, Any] | None, spec: SlideSpec, data_dir: storage.AnyPath,
                      config: TilingConfig) -> dict[str, Any]:
    """The result `tile_job` returned on the worker, its sidecar read back from DATA_DIR."""
    where = (f"the workers must write {str(data_dir)!r} on storage that this machine reads at the same "
             f"path ({README_SECTION})")
    if result is None:
        raise InputError(f"slide {spec.slide_id!r}: the Beam pipeline finished but left no result for it in "
                         f"{str(data_dir / WORK_DIR / RESULTS_DIR)!r}; {where}")
    if result["status"] == "tiled":
        sidecar = load_finished(data_dir, spec, config)
        if sidecar is None:
            raise InputError(f"slide {spec.slide_id!r}: tiled by a Beam worker, but its finished files are not in "
                             f"{str(data_dir / WORK_DIR)!r}, or its source files changed meanwhile; {where}")
        return {"slide_id": spec.slide_id, "status": "tiled", "sidecar": sidecar}
    if "problem" in result:
        error = SlideError(spec.slide_id, result["file"], result["problem"])
        return {"slide_id": spec.slide_id, "status": "failed", "error": str(error), "exception": error}
    return {"slide_id": spec.slide_id, "status": "failed", "error": result["error"],
            "exception": RuntimeError(result["unexpected"])}


@contextlib.contextmanager
def _sidecar_progress(jobs: Sequence[SlideSpec], data_dir: storage.AnyPath, show_progress: bool) -> Iterator[None]:
    """A bar of finished slides while the pipeline runs, counted from the sidecars in DATA_DIR (the
    workers may be other machines, so nothing else reaches this process before the end)."""
    if not show_progress:
        yield
        return
    sidecars = {slide_paths(data_dir, spec.slide_id)["sidecar"].name for spec in jobs}
    work = data_dir / WORK_DIR
    stop = threading.Event()

    def watch() -> None:
        with tqdm(total=len(jobs), desc="slides (Beam)", unit="slide") as bar:
            while True:
                stopping = stop.wait(PROGRESS_INTERVAL_S)
                # One listing per interval, not one request per slide (a bucket answers each).
                bar.update(len(sidecars.intersection(path.name for path in work.glob("*.json"))) - bar.n)
                if stopping:
                    return

    thread = threading.Thread(target=watch, name="beam-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
