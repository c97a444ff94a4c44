"""Child processes that end when the process that started them dies, even by SIGKILL.

A process killed with SIGKILL (as the kernel's OOM killer does) runs no clean-up, and the processes
it started stay alive, blocked on pipes or sockets to it: the tiler's pool workers, the Manager's
server, Beam's SDK workers, and through them multiprocessing's resource tracker (which ends by itself
once no process holds its pipe). A child that calls `exit_with(pid)` early ends, without clean-up,
within POLL_INTERVAL_S once `pid` has died; like a kill, which the tiler resumes from (its sidecars).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

POLL_INTERVAL_S = 0.5
EXIT_STATUS = 1
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_lock = threading.Lock()
_watched: set[int] = set()


def initargs() -> tuple[int, bool]:
    """`exit_with`'s arguments for the children that the calling thread is about to start: this process,
    and whether PR_SET_PDEATHSIG is safe for them (it fires when the thread that started the child
    ends, not the process, so only the main thread's children may use it)."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def exit_with(pid: int, deathsig: bool = False) -> None:
    """Ends this process once process `pid`, its parent or a further ancestor, has died.

    A daemon thread checks every POLL_INTERVAL_S that `pid` is still an ancestor: an orphan is handed to
    init (or a subreaper), so this needs nobody to reap `pid`, and a reused pid is never an ancestor.
    With `deathsig` and `pid` the parent, Linux also SIGKILLs this process the moment the parent dies
    (`initargs` says when that is safe). Does nothing in `pid` itself, or for a `pid` already watched.
    """
    with _lock:
        if pid == os.getpid() or pid in _watched:
            return
        _watched.add(pid)
    if deathsig and sys.platform == "linux" and pid == os.getppid():
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if not _is_ancestor(pid):  # it died before the watch began (e.g. before the prctl above)
        os._exit(EXIT_STATUS)
    threading.Thread(target=_watch, args=(pid,), name=f"exit-with-{pid}", daemon=True).start()


def _watch(pid: int) -> None:
    while _is_ancestor(pid):
        time.sleep(POLL_INTERVAL_S)
    # os._exit, not sys.exit: the main thread is blocked on the dead process and would never see an
    # exception, and clean-up (joining threads, flushing queues to the dead parent) could block too.
    os._exit(EXIT_STATUS)


def _is_ancestor(pid: int) -> bool:
    parent = os.getppid()
    if parent == pid:
        return True
    if not os.path.exists("/proc/self/stat"):  # no procfs (macOS): whether `pid` still exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    while parent > 1:  # up the ancestors: Beam's SDK workers are started through a `sh -c`
        parent = _parent_of(parent)
        if parent == pid:
            return True
    return False


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # after "(command name)", which may hold spaces
    except OSError:  # it ended meanwhile
        return 0
    return int(fields[1])
