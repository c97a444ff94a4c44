"""`gerne-jax predict --slide`, and one manifest predicted by several processes (`--shard I/N`, or the processes
of a multi-process JAX run) into one OUT.

The reference is always one process predicting the same slides with the same command: `--slide` must
write exactly what a one-row manifest writes, and shards (concurrent subprocesses, or one after the other
in any order) and two JAX processes (CPU, gloo, a localhost coordinator) exactly what one process writes
for the whole manifest, every file byte for byte (lock files aside). The slides and the tiny run are the
`slide_run` fixture's (tests/slide_run.py).
"""
from __future__ import annotations

import csv
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from gerne_jax.commands import predict
from gerne_jax.core import files
from gerne_jax.core.errors import InputError
from gerne_jax.predict import prediction, run_outputs, slide_prediction
from gerne_jax.slides.manifest import SlideError
from tests.helpers import REPO, folder_bytes
from tests.slide_run import write_manifest

LIMIT_S = 600  # a hung barrier fails the test with the processes' output instead of hanging the suite
LAUNCHER_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                      "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES",
                      "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


# ---------------------------------------------------------------------------------------------------
# Without a model
# ---------------------------------------------------------------------------------------------------
def test_shards_partition_the_manifest_by_position_mod_n():
    specs = [f"slide_{k}" for k in range(11)]  # `take` only slices
    for count in (1, 2, 3, 5, 11, 12):
        shares = [prediction.Shard.parse(f"{index}/{count}").take(specs) for index in range(count)]
        for index, share in enumerate(shares):
            assert share == [specs[k] for k in range(len(specs)) if k % count == index]
        assert sorted(sum(shares, [])) == sorted(specs)
    assert prediction.Shard.parse(" 3/4 ") == prediction.Shard(3, 4)


@pytest.mark.parametrize("text", ["2/2", "x", "-1/2", "1/0", "1/2/3", "1 / 2 x"])
def test_bad_shard_is_one_line_naming_it(text):
    with pytest.raises(InputError, match="--shard") as raised:
        prediction.Shard.parse(text)
    assert text in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("name, expected", [("a.tif", "a"), ("b.ome.tif", "b"), ("c.OME.TIFF", "c"),
                                            ("d.v2.tiff", "d.v2"), ("e.svs", "e"), ("f", "f"), ("g.ome.png", "g.ome")])
def test_default_slide_id_is_the_file_name_without_its_extension(name, expected):
    assert prediction.default_slide_id(pathlib.Path("/slides") / name) == expected


def test_single_slide_checks_its_files_and_values(tmp_path):
    image, mask = tmp_path / "s.ome.tif", tmp_path / "m.tif"
    image.write_bytes(b"")
    mask.write_bytes(b"")
    spec = prediction.single_slide(image, mask=mask, mpp="0.5", channel_names="A, B,C")
    assert (spec.slide_id, spec.image_files, spec.mask_file, spec.annotations_file) == ("s", (image,), mask, None)
    assert (spec.mpp, spec.channel_names, spec.split, spec.patient_id) == (0.5, ("A", "B", "C"), None, None)
    with pytest.raises(SlideError, match=r"slide 's'.*no_mask\.tif.*file not found \(--mask\)"):
        prediction.single_slide(image, mask=tmp_path / "no_mask.tif")
    for options, message in [({"mask": mask, "annotations": mask}, "not both"), ({"mpp": "0"}, "--mpp"),
                             ({"mpp": "x"}, "--mpp"), ({"channel_names": "A,A"}, "--channel-names"),
                             ({"channel_names": "A,,B"}, "--channel-names"), ({"slide_id": " "}, "--slide-id")]:
        with pytest.raises(InputError, match=message) as raised:
            prediction.single_slide(image, **options)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one of --manifest .* and --slide .*found neither"),
    (["--manifest", "m.csv", "--slide", "s.tif"], "exactly one of --manifest .* and --slide .*not both"),
    (["--manifest", "m.csv", "--mask", "m.tif"], "--mask describe"),
    (["--slide", "s.tif", "--split", "test"], "--split .* --slide"),
    (["--manifest", "m.csv", "--shard", "2/2"], "--shard '2/2'"),
    (["--manifest", "m.csv", "--shard", "x"], "--shard 'x'"),
    (["--slide", "MISSING/s.tif"], r"slide 's', file .*MISSING/s\.tif.*file not found \(--slide\)"),
])
def test_command_line_errors_are_one_line_before_the_run_is_read(tmp_path, extra, message):
    """Answered before the run is opened: the workdir does not exist, and its error would be another one."""
    argv = ["--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "out"),
            *[str(tmp_path / arg) if arg.startswith("MISSING") else arg for arg in extra]]
    with pytest.raises(InputError, match=message) as raised:
        predict.main(argv)
    assert "\n" not in str(raised.value) and "no_run" not in str(raised.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# With the slide_run fixture's run
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_slide_and_shared_predictions_write_what_one_process_does(slide_run, tmp_path, capsys):
    """One test over the trained run (its fixture costs a tiling and a training; under xdist every worker
    running a test of this module would pay it again)."""
    common = ["--workdir", str(slide_run["run"]), "--checkpoint", "latest"]
    one_slide_is_a_one_row_manifest(slide_run, tmp_path, common)
    manifest = str(slide_run["manifest"])  # three slides
    reference = tmp_path / "one_process"
    assert predict.main([*common, "--manifest", manifest, "--out", str(reference)]) == 0
    expected = outputs(reference)
    assert _statuses(reference) == ["predicted"] * 3
    shards_in_turn_in_any_order(common + ["--manifest", manifest], tmp_path / "in_turn", expected, capsys)
    concurrent_shards(common + ["--manifest", manifest], tmp_path / "concurrent", expected)
    jax_processes(common + ["--manifest", manifest], tmp_path, expected)


def one_slide_is_a_one_row_manifest(slide_run, tmp_path, common):
    row = slide_run["test_rows"][0]
    assert pathlib.Path(row["image"]).stem == row["slide_id"]  # so the default id is the manifest's
    single = tmp_path / "single"
    assert predict.main([*common, "--slide", row["image"], "--mask", row["mask"], "--out", str(single)]) == 0
    manifest = write_manifest(tmp_path / "one_row.csv", [{key: row[key] for key in ("slide_id", "image", "mask")}])
    one_row = tmp_path / "one_row"
    assert predict.main([*common, "--manifest", str(manifest), "--out", str(one_row)]) == 0
    assert _statuses(single) == ["predicted"]
    assert (slide_prediction.slide_dir(single, row["slide_id"]) / slide_prediction.SUMMARY_FILE).is_file()
    assert outputs(single) == outputs(one_row)


def shards_in_turn_in_any_order(command, out, expected, capsys):
    capsys.readouterr()
    assert predict.main([*command, "--out", str(out), "--shard", "1/2"]) == 0
    # shard 1 of 2 did the second slide; the others are shard 0's, still to come
    assert _statuses(out) == ["pending", "predicted", "pending"]
    assert "2 slide(s) pending in other shards" in capsys.readouterr().out
    assert predict.main([*command, "--out", str(out), "--shard", "0/2"]) == 0
    assert "pending" not in capsys.readouterr().out
    assert outputs(out) == expected
    # a rerun of a finished shard resumes its slides and writes the same outputs
    assert predict.main([*command, "--out", str(out), "--shard", "0/2"]) == 0
    assert "resuming: 2 slide(s) already predicted, 0 to go" in capsys.readouterr().out
    assert outputs(out) == expected


def concurrent_shards(command, out, expected):
    launches = [_launch([*command, "--out", str(out), "--shard", f"{index}/2"], out.parent / f"shard{index}.log")
                for index in range(2)]
    for name, (status, output) in zip(("shard 0", "shard 1"), _wait(launches)):
        assert status == 0, f"{name} exited with {status}:\n{output[-3000:]}"
    assert outputs(out) == expected


def jax_processes(command, tmp_path, expected):
    """Two processes of one JAX run: each predicts its share on its own device, process 0 writes the run
    outputs. First with shard 1's lock held elsewhere: both stop with one line, none waits forever."""
    blocked = tmp_path / "blocked"
    with files.exclusive_lock(blocked / run_outputs.LOCKS_DIR / "shard-1-of-2", "the test"):
        results = _wait(_pair([*command, "--out", str(blocked)], tmp_path / "blocked"))
    for index, (status, output) in enumerate(results):
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(errors) == 1, f"process {index} exited with {status}:\n{output[-3000:]}"
        assert ("shard-1-of-2 is in use by pid" if index == 1 else "process 1 of the run stopped") in errors[0]
    assert not (blocked / "slides.csv").exists()

    out = tmp_path / "jax_processes"
    for index, (status, output) in enumerate(_wait(_pair([*command, "--out", str(out)], out.parent / "pair"))):
        assert status == 0, f"process {index} exited with {status}:\n{output[-3000:]}"
    assert outputs(out) == expected


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def outputs(out: pathlib.Path) -> dict[str, bytes]:
    """Every file of a prediction but the locks (which name their holder), by relative path."""
    found = {name: data for name, data in folder_bytes(out).items()
             if pathlib.PurePath(name).name != ".lock" and pathlib.PurePath(name).parts[0] != run_outputs.LOCKS_DIR}
    assert "slides.csv" in found and "metrics.json" in found
    return found


def _statuses(out: pathlib.Path) -> list[str]:
    with open(out / "slides.csv", newline="") as handle:
        return [row["status"] for row in csv.DictReader(handle)]


def _env() -> dict[str, str]:
    # Nor a launcher's variables (a suite run inside an srun step): the processes are launched as written here.
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    return {**env, "PYTHONPATH": str(REPO)}


def _launch(args: list[str], log: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
    """`python -m gerne_jax predict ARGS` in its own process group, its output in `log`."""
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "gerne_jax", "predict", *args], cwd=REPO, env=_env(),
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def _pair(args: list[str], log_stem: pathlib.Path) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    return [_launch([*args, "--distributed", "on", "--coordinator-address", f"localhost:{port}",
                     "--num-processes", "2", "--process-id", str(index)], pathlib.Path(f"{log_stem}.{index}.log"))
            for index in range(2)]


def _wait(launches: list[tuple[subprocess.Popen, pathlib.Path]]) -> list[tuple[int, str]]:
    """(exit status, output) of each launch; past LIMIT_S all are killed and the test fails with their output."""
    try:
        for process, _ in launches:
            process.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        for process, _ in launches:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pytest.fail("predict processes still running after the limit:\n" + "\n".join(
            f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}" for _, log in launches))
    return [(process.returncode, log.read_text(errors="replace").replace("\r", "\n")) for process, log in launches]
