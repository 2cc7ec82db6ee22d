"""Run the gramlin-analyze CLI and ``kill -9`` it at its N-th change to a store's files.

A change is a rename into place (zarr's and the store's atomic writes), a
removal, or a directory tree removal under the store. ``KILL_AT=N`` sends
SIGKILL to this process just before the N-th; without it, the number of
changes is written to ``COUNT_FILE`` at exit. Only the tests use this.

    python tests/kill_at.py STORE [CLI ARGS ...]
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import signal
import sys
import threading

store = os.path.realpath(sys.argv[1])
kill_at = int(os.environ.get("KILL_AT", "0"))
count_file = os.environ.get("COUNT_FILE")
lock = threading.Lock()
count = 0


def _under_store(path) -> bool:
    try:
        return os.path.realpath(os.fspath(path)).startswith(store)
    except TypeError:
        return False


def _change(path) -> None:
    global count
    if not _under_store(path):
        return
    with lock:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str, arg: int = 0) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kw):
        _change(args[arg] if arg < len(args) else kw.get("dst", kw.get("path")))
        return real(*args, **kw)

    setattr(owner, name, wrapped)


# Path.replace(self, target): the target is the store's file; the same for renames.
_wrap(pathlib.Path, "replace", 1)
_wrap(pathlib.Path, "rename", 1)
_wrap(pathlib.Path, "unlink", 0)
_wrap(os, "replace", 1)
_wrap(os, "rename", 1)
_wrap(os, "unlink", 0)
_wrap(os, "remove", 0)
_wrap(shutil, "rmtree", 0)

if count_file:
    atexit.register(lambda: pathlib.Path(count_file).write_text(str(count)))

from gramlin_analyze.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
