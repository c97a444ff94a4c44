"""No process of the tiler outlives its launching process, even one killed by SIGKILL (issue 26).

The kernel's OOM killer ends a process with SIGKILL, which runs no clean-up: the processes it started
(pool workers, the Manager's server, multiprocessing's resource tracker, Beam's SDK workers) must end
by themselves. Each command runs in its own session, so that every process it started, however deep,
is found by its session id in /proc; only the launcher is killed. A rerun of the same command then
resumes from the finished slides' sidecars and publishes what an uninterrupted run publishes.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from data_pipeline.tiling import WORK_DIR
from tests.helpers import REPO, RUN_SPECIFIC, folder_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds a session's processes in /proc")

ENV = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
DEADLINE_S = 30.0   # generous: the processes end within about a second
POLL_S = 0.02
REPORT = "tiling_report.json"


def living_processes(session: int) -> dict[int, str]:
    """pid -> command line of the processes of `session` that have not ended (zombies, ended but not
    yet reaped by their new parent, are left out)."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat, command = (entry / "stat").read_bytes(), (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        state, _, _, sid = stat.rsplit(b")", 1)[1].split()[:4]  # after "(command name)"
        if int(sid) == session and state not in (b"Z", b"X"):
            found[int(entry.name)] = command.replace(b"\0", b" ").decode(errors="replace")[:160]
    return found


@contextlib.contextmanager
def own_session(command: list[str], log: pathlib.Path) -> Iterator[subprocess.Popen]:
    """Starts `command` as the leader of a new session (its pid is the session id); on leaving, kills
    whatever of the session still lives, so that a failing test leaves nothing behind."""
    with open(log, "w") as output:
        launcher = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        yield launcher
    finally:
        for pid in living_processes(launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


def kill_and_wait(launcher: subprocess.Popen, log: pathlib.Path) -> dict[int, str]:
    """SIGKILLs the launcher only; asserts that every other process of its session ends soon after.
    Returns the processes that were running beside it."""
    started = living_processes(launcher.pid)
    started.pop(launcher.pid, None)
    assert started, f"nothing ran beside the launcher; its output:\n{log.read_text()[-3000:]}"
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + DEADLINE_S
    while (alive := living_processes(launcher.pid)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert alive == {}, f"still alive {DEADLINE_S:.0f} s after the launcher was killed: {alive}"
    return started


def tile_command(slides: pathlib.Path, out: pathlib.Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "tile", "--manifest", str(slides / "manifest.csv"),
            "--out", str(out), "--patch-size", "64", "--workers", "2", *options]


def run(command: list[str], log: pathlib.Path) -> None:
    with open(log, "w") as output:
        completed = subprocess.run(command, cwd=REPO, env=ENV, stdout=output, stderr=subprocess.STDOUT)
    assert completed.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("orphan_slides")
    run([sys.executable, "-m", "data_pipeline", "synthetic", "--out", str(root), "--slides", "6", "--size", "1024",
         "--seed", "0"], root / "synthetic.log")
    return root


@pytest.fixture(scope="module")
def uninterrupted(slides: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "data"
    run(tile_command(slides, out), out.parent / "tile.log")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("options", [(), ("--runner", "beam")], ids=["pool", "beam"])
def test_killed_launcher_leaves_no_process_and_a_rerun_resumes(slides, uninterrupted, tmp_path, options):
    out, log = tmp_path / "data", tmp_path / "killed.log"
    command = tile_command(slides, out, *options)
    with own_session(command, log) as launcher:
        deadline = time.monotonic() + 120
        while not list((out / WORK_DIR).glob("*.json")):  # a slide's sidecar: tiling is under way
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(POLL_S)
        kill_and_wait(launcher, log)
    finished = {path.stem for path in (out / WORK_DIR).glob("*.json")}
    assert 0 < len(finished) < 6, "killed while tiling"

    run(command, tmp_path / "rerun.log")
    resumed, reference = folder_bytes(out), folder_bytes(uninterrupted)
    # A write the kill cut leaves its NAME.tmp-PID file; the rerun removes it (no file more or less).
    assert sorted(resumed) == sorted(reference)
    differing = RUN_SPECIFIC | {REPORT}  # the lock names its holder; the report, below
    assert differing <= set(reference)
    assert [name for name in reference if name not in differing and resumed[name] != reference[name]] == []
    # The report differs only in how each slide was done: resumed from its sidecar, or tiled.
    report, reference_report = json.loads(resumed[REPORT]), json.loads(reference[REPORT])
    status = {slide_id: entry.pop("status") for slide_id, entry in report["slides"].items()}
    assert {entry.pop("status") for entry in reference_report["slides"].values()} == {"tiled"}
    assert report == reference_report
    assert status == {slide_id: "resumed" if slide_id in finished else "tiled" for slide_id in status}


# Like Beam's local SDK workers: started through `sh -c`, so the process to outlive is not the parent, and
# without PR_SET_PDEATHSIG (its thread, not its process, would count): only the watch ends the worker.
LAUNCHER = textwrap.dedent("""
    import os, shlex, subprocess, sys, time
    worker = ("import sys, time; from data_pipeline import parent_watch; "
              "parent_watch.exit_with(int(sys.argv[1])); print('watching', flush=True); time.sleep(600)")
    subprocess.Popen(f"{shlex.quote(sys.executable)} -c {shlex.quote(worker)} {os.getpid()}", shell=True)
    time.sleep(600)
""")


def test_a_watching_grandchild_ends_with_the_process_it_watches(tmp_path):
    log = tmp_path / "launcher.log"
    with own_session([sys.executable, "-c", LAUNCHER], log) as launcher:
        deadline = time.monotonic() + DEADLINE_S
        while "watching" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(POLL_S)
        started = kill_and_wait(launcher, log)
    assert len(started) == 2  # the shell and the worker
