"""Where the tiler writes a DATA_DIR: a local folder, or any URL that fsspec can write (gs://, s3://, ...).

`location(out)` turns `--out` into a `pathlib.Path`, or into a `RemotePath` for a URL (`PROTOCOL://...`,
file:// included). `RemotePath` has the few pathlib methods the tiler calls (`/`, `name`, `parent`,
`exists`, `read_text`, `unlink`, `mkdir`, `glob`, `iterdir`, `is_absolute`), so that code stays one
code path for both; the writes that pathlib has no atomic form of (`write_text`, `upload`, `copy`,
`replace`, `remove_tree`, `size`) are functions here that do on a local path exactly what the tiler
always did (a temporary name and `os.replace`, hard links, `shutil.rmtree`).

On a URL, every file appears whole or not at all: it is written to a temporary name beside its target
(`NAME.tmp-PID-RANDOM`) and then moved onto it. Object stores have no atomic rename (a move is a
server-side copy and a delete), but an object becomes visible only once complete, so a reader sees the
old file or the new one, never a partial one. The array_record writer and the PNG writer need local
files: a worker tiles a slide into a local temporary folder and uploads the results
(`slide_jobs.tile_job`).

A `RemotePath` pickles as its URL, so Beam workers and pool processes each open their own file
system client. File systems other than the local one and memory:// come from their fsspec package:
gs:// needs `pip install gcsfs`, s3:// `pip install s3fs` (neither is a dependency of this package).
"""
from __future__ import annotations

import os
import pathlib
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import fsspec.core

from gerne_jax.core import files
from gerne_jax.core.errors import InputError

URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
INSTALL_HINT = "gs:// needs `pip install gcsfs`, s3:// `pip install s3fs`"


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and URL_PATTERN.match(location) is not None


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of `url` and the path in it; InputError naming the URL if none serves it."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # fsspec: "Please install gcsfs ...", "Protocol not known"
        raise InputError(f"{url!r}: {error} ({INSTALL_HINT})") from error


class RemotePath:
    """A file or folder at an fsspec URL, with the pathlib methods the tiler uses."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    @property
    def _fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.url)  # fsspec caches its file system objects: cheap after the first

    def _fresh(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """`_fs_path`, with the file system's listing cache of this path dropped: other machines (the
        workers) write here, and gcsfs / s3fs would otherwise answer from a listing made before."""
        fs, path = self._fs_path
        fs.invalidate_cache(path)
        return fs, path

    def __reduce__(self):
        return RemotePath, (self.url,)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(posixpath.dirname(self.url))

    @property
    def in_one_process(self) -> bool:
        """Whether the file system is this process's memory (memory://: tests), unseen by other processes."""
        protocol = self._fs_path[0].protocol
        return "memory" in ((protocol,) if isinstance(protocol, str) else protocol)

    def is_absolute(self) -> bool:
        return True  # a URL means the same on every machine

    def exists(self) -> bool:
        fs, path = self._fresh()
        return fs.exists(path)

    def read_bytes(self) -> bytes:
        fs, path = self._fresh()
        return fs.cat_file(path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._fs_path
        if missing_ok and not fs.exists(path):
            return
        fs.rm_file(path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        del parents  # object stores have no folders; a local or memory file system makes the parents too
        fs, path = self._fs_path
        fs.makedirs(path, exist_ok=exist_ok)

    def iterdir(self) -> Iterator[RemotePath]:
        fs, path = self._fresh()
        for entry in sorted(fs.ls(path, detail=False)):
            yield self / posixpath.basename(entry.rstrip("/"))

    def glob(self, pattern: str) -> list[RemotePath]:
        """The files of this folder whose name matches `pattern` (one level: no '/' in it)."""
        fs, path = self._fresh()
        return [self / posixpath.basename(found) for found in sorted(fs.glob(f"{path}/{pattern}"))]


AnyPath = pathlib.Path | RemotePath


def location(out: str | os.PathLike | RemotePath) -> AnyPath:
    """`--out` as a local path, or as a RemotePath for a URL (its file system checked now, so a
    missing fsspec package is named before anything runs)."""
    if isinstance(out, RemotePath):
        return out
    if not is_url(out):
        return pathlib.Path(out)
    remote = RemotePath(out)
    remote._fs_path  # noqa: B018 - raises InputError for an unknown protocol
    return remote


def _temporary(target: RemotePath) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """The file system, the target's path and a temporary sibling name unique to this writer."""
    fs, path = target._fs_path
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # local and memory file systems need the folder
    return fs, path, f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _move_into_place(fs: fsspec.AbstractFileSystem, temporary: str, path: str, write: Callable[[], Any]) -> None:
    """Writes `temporary` with `write()` and moves it onto `path`; removes it on error."""
    try:
        write()
        fs.mv(temporary, path)
    except BaseException:
        if fs.exists(temporary):
            fs.rm_file(temporary)
        raise


def write_text(path: AnyPath, text: str) -> None:
    """Writes `text` whole or not at all (`files.write_text_atomic` on a local path)."""
    if isinstance(path, pathlib.Path):
        files.write_text_atomic(path, text)
        return
    fs, target, temporary = _temporary(path)
    _move_into_place(fs, temporary, target, lambda: fs.pipe_file(temporary, text.encode()))


def upload(local: pathlib.Path, path: RemotePath) -> None:
    """Copies the local file `local` to `path`, whole or not at all."""
    fs, target, temporary = _temporary(path)
    _move_into_place(fs, temporary, target, lambda: fs.put_file(os.fspath(local), temporary))


def copy(source: AnyPath, target: AnyPath) -> None:
    """`target` becomes a copy of `source` (both local, or both on one file system). Locally a hard
    link where the file system has them; at a URL a server-side copy where the store has one (gs://, s3://)."""
    if isinstance(source, pathlib.Path) and isinstance(target, pathlib.Path):
        try:
            os.link(source, target)
        except OSError:  # file systems without hard links
            shutil.copyfile(source, target)
        return
    fs, source_path = _same_filesystem(source, target)
    fs, target_path, temporary = _temporary(target)
    _move_into_place(fs, temporary, target_path, lambda: fs.copy(source_path, temporary))


def replace(source: AnyPath, target: AnyPath) -> None:
    """Moves `source` onto `target` (`os.replace` on local paths)."""
    if isinstance(source, pathlib.Path) and isinstance(target, pathlib.Path):
        os.replace(source, target)
        return
    fs, source_path = _same_filesystem(source, target)
    fs.mv(source_path, target._fs_path[1])


def remove_tree(path: AnyPath) -> None:
    """Removes the folder `path` and everything in it, if it exists."""
    if isinstance(path, pathlib.Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, fs_path = path._fs_path
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)


def size(path: AnyPath) -> int:
    if isinstance(path, pathlib.Path):
        return path.stat().st_size
    fs, fs_path = path._fs_path
    return fs.size(fs_path)


def _same_filesystem(source: AnyPath, target: AnyPath) -> tuple[fsspec.AbstractFileSystem, str]:
    if not (isinstance(source, RemotePath) and isinstance(target, RemotePath)):
        raise ValueError(f"{source} and {target}: both local paths or both URLs")
    fs, source_path = source._fs_path
    if target._fs_path[0] is not fs:
        raise ValueError(f"{source} and {target} are on different file systems")
    return fs, source_path
