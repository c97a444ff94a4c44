"""`python -m data_pipeline tile --runner beam` against the local runner on the same manifest.

The Beam runs use the DirectRunner in multi-processing mode on two worker processes, passed through
`--beam-option` as a user would. The local runner is the reference: its output is checked against a
brute-force computation in tests/pipeline/test_tiling.py, so equality here carries that check over.
"""
from __future__ import annotations

import csv
import json
import pathlib
import socket
import sys
import tempfile

import pytest
from apache_beam.options.pipeline_options import DirectOptions

import data_pipeline
from data_pipeline import beam_runner
from data_pipeline.__main__ import main
from gerne_jax.core.errors import InputError
from gerne_jax.slides import tiling_report
from gerne_jax.slides.manifest import SlideError
from tests.helpers import RUN_SPECIFIC, folder_bytes
from tests.tiff_layouts import write_with_corrupt_tile

BEAM_TWO_WORKERS = ("--runner", "beam", "--beam-option=--direct_running_mode=multi_processing",
                    "--beam-option=--direct_num_workers=2")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Four synthetic slides (2 train, 1 validation, 1 test) and two broken copies of one of them:
    `truncated` (cut in half: its header pass fails in the launching process) and `corrupt` (one
    compressed tile overwritten: only decoding its pixels fails, so on a Beam worker)."""
    root = tmp_path_factory.mktemp("beam_slides")
    assert main(["synthetic", "--out", str(root), "--slides", "4", "--size", "384", "--seed", "3"]) == 0
    source = root / "slide_001.tif"
    data = source.read_bytes()
    (root / "truncated.tif").write_bytes(data[: len(data) // 2])
    write_with_corrupt_tile(source, root / "corrupt.tif")
    return root


def manifest_with(slides: pathlib.Path, name: str, broken: list[str], first: bool = False) -> pathlib.Path:
    """The synthetic manifest plus rows for the broken copies (image replaced), before or after it."""
    with open(slides / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    extra = [dict(rows[1], slide_id=b, image=f"{b}.tif", patient_id=f"patient_{b}", split="train") for b in broken]
    path = slides / name
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(extra + rows if first else rows + extra)
    return path


def tile(manifest: pathlib.Path, out: pathlib.Path, *options: str) -> int:
    return main(["tile", "--manifest", str(manifest), "--out", str(out), "--patch-size", "32", *options])


def assert_same_data_dir(local: pathlib.Path, beam: pathlib.Path) -> None:
    local_files, beam_files = folder_bytes(local), folder_bytes(beam)
    assert sorted(local_files) == sorted(beam_files)
    assert RUN_SPECIFIC <= set(local_files)
    assert [name for name in local_files if name not in RUN_SPECIFIC and local_files[name] != beam_files[name]] == []


def report(data_dir: pathlib.Path) -> dict:
    return json.loads((data_dir / tiling_report.FILE_NAME).read_text())


@pytest.mark.slow
def test_beam_writes_the_local_runners_data_dir_byte_for_byte(slides, tmp_path, monkeypatch):
    manifest = slides / "manifest.csv"
    assert tile(manifest, tmp_path / "local") == 0
    # A local pipeline needs no network (Beam's DirectRunner would try to download its Prism runner
    # first) and leaves nothing in the temporary folder.
    hosts_looked_up = []

    def no_network(host, *args, **kwargs):
        hosts_looked_up.append(host)
        raise OSError(f"no network in this test ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    assert tile(manifest, tmp_path / "beam", *BEAM_TWO_WORKERS) == 0
    assert hosts_looked_up == [] and list(temporary.iterdir()) == []
    monkeypatch.undo()
    assert_same_data_dir(tmp_path / "local", tmp_path / "beam")
    assert len(list((tmp_path / "beam").glob("gerne_patches-*.array_record-*"))) == 4
    assert {s["status"] for s in report(tmp_path / "beam")["slides"].values()} == {"tiled"}
    assert not (tmp_path / "beam" / ".work" / beam_runner.RESULTS_DIR).exists()
    # A rerun resumes every slide (no pipeline is started) and republishes the same bytes.
    assert tile(manifest, tmp_path / "beam", *BEAM_TWO_WORKERS) == 0
    assert {s["status"] for s in report(tmp_path / "beam")["slides"].values()} == {"resumed"}
    assert folder_bytes(tmp_path / "beam")["patches.csv"] == folder_bytes(tmp_path / "local")["patches.csv"]


@pytest.mark.slow
def test_broken_slides_are_reported_as_by_the_local_runner(slides, tmp_path, capsys):
    manifest = manifest_with(slides, "broken.csv", ["truncated", "corrupt"])
    errors = {}
    for runner, options in (("local", ()), ("beam", BEAM_TWO_WORKERS)):
        with pytest.raises(InputError, match="2 of 6 slide"):
            tile(manifest, tmp_path / runner, "--skip-errors", *options)
        errors[runner] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  slide ")]
    assert_same_data_dir(tmp_path / "local", tmp_path / "beam")
    slides_report = report(tmp_path / "beam")["slides"]
    assert slides_report["truncated"]["status"] == slides_report["corrupt"]["status"] == "failed"
    assert "truncated TIFF" in slides_report["truncated"]["error"]
    assert slides_report["corrupt"]["error"].startswith("slide 'corrupt', file ")
    assert "cannot read TIFF data" in slides_report["corrupt"]["error"]
    assert errors["beam"] == errors["local"] and len(errors["beam"]) == 2

    # Without --skip-errors: the same error as the local runner's, nothing of the slide written, nothing published.
    stop_first = manifest_with(slides, "corrupt_first.csv", ["corrupt"], first=True)
    raised = {}
    for runner, options in (("local", ()), ("beam", BEAM_TWO_WORKERS)):
        with pytest.raises(SlideError) as error:
            tile(stop_first, tmp_path / f"stop_{runner}", *options)
        raised[runner] = str(error.value)
    assert raised["beam"] == raised["local"] == slides_report["corrupt"]["error"]
    out = tmp_path / "stop_beam"
    assert not list(out.rglob("corrupt*")) and not (out / "dataset_info.json").exists()
    assert report(out)["slides"]["corrupt"]["status"] == "failed"


def test_pipeline_options_pass_through_with_local_defaults():
    defaults = beam_runner.pipeline_options([], workers=3).view_as(DirectOptions)
    assert (defaults.direct_running_mode, defaults.direct_num_workers) == ("multi_processing", 3)
    chosen = beam_runner.pipeline_options(["--direct_num_workers=2", "--direct_running_mode=in_memory"], 3)
    assert (chosen.view_as(DirectOptions).direct_running_mode, chosen.view_as(DirectOptions).direct_num_workers) == (
        "in_memory", 2)
    assert chosen.get_all_options()["runner"] is None  # the DirectRunner, Beam's default
    assert chosen.get_all_options()["default_sdk_harness_log_level"] == "ERROR"  # quiet local workers
    flink = beam_runner.pipeline_options(["--runner=FlinkRunner", "--flink_master=host:8081", "--parallelism=8"], 3)
    assert {k: v for k, v in flink.get_all_options(drop_default=True).items() if not k.startswith("direct_")} == {
        "runner": "FlinkRunner", "flink_master": "host:8081", "parallelism": 8}


@pytest.mark.parametrize("options, message", [
    (["--runner", "beam", "--beam-option=--direct_num_wrokers=2"],
     r"unknown Beam pipeline option\(s\) \['--direct_num_wrokers'\]"),
    (["--runner", "beam", "--beam-option=runner=DataflowRunner"],
     "--beam-option 'runner=DataflowRunner': a Beam pipeline option is written"),
    (["--runner", "beam", "--beam-option=--direct_num_workers=two"],
     "--beam-option: argument --direct_num_workers: invalid int value: 'two'"),
    (["--beam-option=--runner=DataflowRunner"], r"--beam-option \['--runner=DataflowRunner'\] needs --runner beam"),
])
def test_bad_beam_options_are_named_before_anything_is_written(slides, tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        tile(slides / "manifest.csv", tmp_path / "out", *options)
    assert not (tmp_path / "out").exists()


def test_without_apache_beam_the_runner_says_what_to_install(slides, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` fails as if not installed
    monkeypatch.delitem(sys.modules, "data_pipeline.beam_runner")
    monkeypatch.delattr(data_pipeline, "beam_runner")
    with pytest.raises(InputError, match=r"--runner beam needs Apache Beam.*pip install 'gerne-jax\[beam\]'"):
        tile(slides / "manifest.csv", tmp_path / "out", "--runner", "beam")
    assert not (tmp_path / "out").exists()


def test_workers_elsewhere_need_absolute_paths(slides, monkeypatch):
    """Workers of a runner other than the DirectRunner have their own working directory."""
    monkeypatch.chdir(slides)
    with pytest.raises(InputError, match=r"--runner=FlinkRunner: the workers resolve relative paths .* absolute "
                                         r"paths \(relative here: \['out', 'slide_000_tumour.tif'"):
        tile(pathlib.Path("manifest.csv"), pathlib.Path("out"), "--runner", "beam",
             "--beam-option=--runner=FlinkRunner")
    assert not list((slides / "out").rglob("*.json")), "nothing tiled"
