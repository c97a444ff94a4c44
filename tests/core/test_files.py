"""gerne_jax.core.files: results are written whole or not at all, and concurrent writers never collide."""
import os
import pathlib
import subprocess
import sys

import pytest

from gerne_jax.core import files


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
    code = f"from gerne_jax.core import files; print(files.temporary_path({str(path)!r}))"
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    mine = files.temporary_path(path)
    assert mine != pathlib.Path(other)
    assert mine.parent == path.parent and mine.name.startswith(path.name) and str(os.getpid()) in mine.name


def test_new_figure_is_saved_as_a_whole_png_without_pyplot(tmp_path):
    from PIL import Image

    fig, axes = files.new_figure(1, 2, figsize=(4, 2), sharey=True)
    assert len(axes) == 2 and axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    axes[0].plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "error.png"  # the folder is created
    files.save_figure(fig, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(path).size == (4 * 110, 2 * 110)  # figsize in inches at save_figure's 110 dpi
    assert sorted(p.name for p in path.parent.iterdir()) == ["error.png"]
    assert fig.canvas.manager is None  # pyplot neither made nor keeps it: nothing to close
