"""gerne_jax.files: results are written whole or not at all, and concurrent writers never collide."""
import os
import pathlib
import subprocess
import sys

import pytest

from gerne_jax import files


def test_atomic_write_replaces_the_file_only_on_success(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed midway")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind
    files.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_temporary_names_differ_between_processes(tmp_path):
    path = tmp_path / "summary.png"
    code = f"from gerne_jax import files; print(files.temporary_path({str(path)!r}))"
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    mine = files.temporary_path(path)
    assert mine != pathlib.Path(other)
    assert mine.parent == path.parent and mine.name.startswith(path.name) and str(os.getpid()) in mine.name


def test_save_figure_writes_a_whole_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "error.png"  # the folder is created
    files.save_figure(fig, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in path.parent.iterdir()) == ["error.png"]
