"""`python -m data_pipeline tile --out URL`: a DATA_DIR written through fsspec, against the local tiler.

The local tiler writing a local folder is the reference (checked against brute force in
tests/pipeline/test_tiling.py); a DATA_DIR at a URL must hold the same files, byte for byte. fsspec's
memory:// file system lives in one process, so it is written by Beam's in-process DirectRunner (or
the local runner with one worker); file:// URLs are written by Beam's worker processes.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import pathlib

import fsspec
import pytest

from data_pipeline import storage
from data_pipeline.__main__ import main
from gerne_jax.core.errors import InputError
from gerne_jax.slides import tiling_report
from gerne_jax.slides.manifest import SlideError
from tests.tiff_layouts import write_with_corrupt_tile

BEAM_IN_PROCESS = ("--runner", "beam", "--beam-option=--direct_running_mode=in_memory")
BEAM_TWO_PROCESSES = ("--runner", "beam", "--beam-option=--direct_running_mode=multi_processing",
                      "--beam-option=--direct_num_workers=2")
LOCAL_ONLY = {".lock"}  # a URL has no lock file; every other file is compared


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Four synthetic slides, and `corrupt`: a copy of one with a compressed tile overwritten, so
    that only decoding its pixels fails (on the worker)."""
    root = tmp_path_factory.mktemp("remote_slides")
    assert main(["synthetic", "--out", str(root), "--slides", "4", "--size", "384", "--seed", "5"]) == 0
    write_with_corrupt_tile(root / "slide_001.tif", root / "corrupt.tif")
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "with_corrupt.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([dict(rows[1], slide_id="corrupt", image="corrupt.tif", patient_id="patient_corrupt",
                               split="train"), *rows])
    return root


def tile(manifest: pathlib.Path, out: str | pathlib.Path, *options: str) -> int:
    return main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", "32", *options])


def local_files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def url_files(url: str) -> dict[str, bytes]:
    """Every file under `url`, by path relative to it, read through fsspec."""
    fs, root = fsspec.core.url_to_fs(url)
    return {found[len(root) + 1:]: fs.cat_file(found) for found in sorted(fs.find(root))}


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The local tiler's DATA_DIRs (local runner, local folder): the plain manifest, and the one
    with the corrupt slide under --skip-errors."""
    out = tmp_path_factory.mktemp("remote_reference")
    assert tile(slides / "manifest.csv", out / "plain") == 0
    with pytest.raises(InputError, match="1 of 5 slide"):
        tile(slides / "with_corrupt.csv", out / "broken", "--skip-errors")
    return {name: {k: v for k, v in local_files(out / name).items() if k not in LOCAL_ONLY}
            for name in ("plain", "broken")}


@pytest.fixture
def memory_url(request) -> str:
    """A fresh memory:// folder, removed afterwards (the memory file system is global to the process)."""
    url = f"memory://test-bucket/{request.node.name}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def report(files: dict[str, bytes]) -> dict:
    return json.loads(files[tiling_report.FILE_NAME])


def test_beam_writes_the_local_data_dir_to_a_memory_url(slides, reference, memory_url):
    # A killed run's upload left a temporary file: the next run removes it.
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/.work/slide_000.array_record.tmp-123-abcd", b"partial")
    assert tile(slides / "manifest.csv", memory_url, *BEAM_IN_PROCESS) == 0
    written = url_files(memory_url)
    assert sorted(written) == sorted(reference["plain"])
    assert [name for name in written if written[name] != reference["plain"][name]] == []
    assert {s["status"] for s in report(written)["slides"].values()} == {"tiled"}
    # A rerun resumes every slide from the sidecars at the URL and publishes the same bytes.
    assert tile(slides / "manifest.csv", memory_url, *BEAM_IN_PROCESS) == 0
    rerun = url_files(memory_url)
    assert {s["status"] for s in report(rerun)["slides"].values()} == {"resumed"}
    assert {k: v for k, v in rerun.items() if k != tiling_report.FILE_NAME} == {
        k: v for k, v in written.items() if k != tiling_report.FILE_NAME}


@pytest.mark.slow
def test_beam_worker_processes_write_a_file_url(slides, reference, tmp_path):
    """Two Beam worker processes upload through fsspec's local file system (as to a bucket)."""
    url = f"file://{tmp_path / 'data'}"
    assert tile(slides / "manifest.csv", url, *BEAM_TWO_PROCESSES) == 0
    written = url_files(url)
    assert sorted(written) == sorted(reference["plain"])
    assert [name for name in written if written[name] != reference["plain"][name]] == []


def test_a_broken_slide_at_a_url_is_named_as_by_the_local_tiler(slides, reference, memory_url, capsys):
    with pytest.raises(InputError, match="1 of 5 slide"):
        tile(slides / "with_corrupt.csv", memory_url, "--skip-errors", *BEAM_IN_PROCESS)
    written = url_files(memory_url)
    assert sorted(written) == sorted(reference["broken"])
    assert [name for name in written if written[name] != reference["broken"][name]] == []
    error = report(written)["slides"]["corrupt"]["error"]
    assert error.startswith("slide 'corrupt', file ") and "cannot read TIFF data" in error
    assert f"  {error}" in capsys.readouterr().err.splitlines()

    # Without --skip-errors (local runner, one worker): the slide's error, and nothing published.
    stop = f"{memory_url}/stop"
    with pytest.raises(SlideError) as raised:
        tile(slides / "with_corrupt.csv", stop)
    assert str(raised.value) == error
    stopped = url_files(stop)
    assert report(stopped)["slides"]["corrupt"]["status"] == "failed"
    assert not [name for name in stopped if "corrupt" in name or name == "dataset_info.json"]


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_url_without_its_filesystem_package_names_what_to_install(slides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"'gs://bucket/data': .*gcsfs.*pip install gcsfs"):
        tile(slides / "manifest.csv", "gs://bucket/data", *BEAM_IN_PROCESS)
    with pytest.raises(InputError, match=r"'nosuch://bucket/data': Protocol not known: nosuch"):
        tile(slides / "manifest.csv", "nosuch://bucket/data")
    with pytest.raises(InputError, match=r"--out memory://bucket/data: .* use --workers 1"):
        tile(slides / "manifest.csv", "memory://bucket/data", "--workers", "2")
    assert list(tmp_path.iterdir()) == []


def test_uploads_are_whole_or_not_at_all(tmp_path, memory_url):
    target = storage.location(memory_url) / "table.csv"
    storage.write_text(target, "old")
    with pytest.raises(FileNotFoundError):
        storage.upload(tmp_path / "missing.csv", target)
    assert target.read_text() == "old"
    source = tmp_path / "new.csv"
    source.write_bytes(b"new contents")
    storage.upload(source, target)
    assert url_files(memory_url) == {"table.csv": b"new contents"}  # no temporary file left
