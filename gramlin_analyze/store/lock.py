"""One writer per store: a lock beside the store.

The lock is keyed on the store's canonical spelling (its resolved real path,
or the remote URL normalized), so symlinks and ``./a/../a.zarr`` reach the
same lock. A local store is locked with ``flock`` on ``<store>.lock``: the kernel drops
the lock when the process dies, so a ``kill -9`` never leaves a stale lock.
A remote store (``s3://…``) gets a lock object ``<store>.lock`` written with
the writer's host, pid and time; a writer that died leaves it behind, and
``break_lock=True`` (``--break-lock``) removes it. The object is created with
a conditional write where the store offers one (S3's ``If-None-Match``), so
two writers starting at once cannot both take it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import IO

from gramlin_analyze.errors import StoreLockedError
from gramlin_analyze.store.location import canonical_url, is_remote

__all__ = ["StoreLock", "is_remote"]


class StoreLock:
    """Context manager holding the single-writer lock of a store."""

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        storage_options: dict | None = None,
        break_lock: bool = False,
    ):
        self.url = str(url).rstrip("/")
        self.lock_url = canonical_url(self.url) + ".lock"
        self.storage_options = storage_options or {}
        self.break_lock = break_lock
        self._fh: IO[str] | None = None
        self._fs = None
        self._path = ""
        self._body = b""

    def acquire(self) -> StoreLock:
        if is_remote(self.url):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        path = Path(self.lock_url.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreLockedError(
                f"{self.url}: another ingest or analyze is writing to this store ({holder}); "
                "wait for it to finish (readers are never blocked)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}")
        fh.flush()
        self._fh = fh

    def _acquire_remote(self) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.lock_url, **self.storage_options)
        # The server decides, not a listing this process cached earlier.
        fs.invalidate_cache(path)
        if self.break_lock and fs.exists(path):
            fs.rm_file(path)
        # The token tells this writer's lock from one that replaced it (release()).
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}
        body = json.dumps({**info, "token": uuid.uuid4().hex}).encode()
        try:
            if fs.exists(path):  # for stores whose writes cannot be conditional
                raise FileExistsError(path)
            fs.pipe_file(path, body, mode="create")
        except FileExistsError:
            raise StoreLockedError(
                f"{self.url}: the store is locked by {_holder(fs, path)}; if that writer is no "
                "longer running, re-run with --break-lock"
            ) from None
        self._fs, self._path, self._body = fs, path, body

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        if self._fs is not None:
            fs, self._fs = self._fs, None
            fs.invalidate_cache(self._path)
            # A lock broken with --break-lock while this writer still ran now
            # belongs to the writer that broke it: leave it to that writer.
            try:
                if fs.cat_file(self._path) == self._body:
                    fs.rm_file(self._path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fs, path: str) -> str:
    try:
        info = json.loads(fs.cat_file(path))
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a writer that left no details"
