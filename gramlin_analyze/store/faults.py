"""Faults of the store's environment: a full disk, no permission, a lost remote endpoint.

They are not the checkpoints' fault, and retrying a step will not help: the
command stops with one line naming the store and what to do. Completed steps
stay ``ok``; the rest are redone by the next run.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from gramlin_analyze.errors import StoreUnavailableError
from gramlin_analyze.store.location import canonical_url, is_remote

__all__ = [
    "OrphanedConnectionErrors",
    "StoreUnavailableError",
    "as_store_error",
    "is_connection_error",
    "is_store_fault",
]

#: Errors that writing can raise and reading cannot: always the store's.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
#: Errors that are the store's when they name a file in it.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM}
#: Connection failures of fsspec's HTTP, S3 and GCS clients (botocore, aiohttp).
_CONNECTION_ERRORS = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
}


def is_store_fault(err: BaseException, url: str | os.PathLike) -> bool:
    """Whether ``err`` is a fault of the store's environment rather than of an input."""
    if isinstance(err, StoreUnavailableError):
        return True
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return True
        if isinstance(e, OSError) and e.errno in _PATH_ERRNOS and _names_store(e, url):
            return True
        if is_remote(url) and is_connection_error(e):
            return True
    return False


def as_store_error(
    err: BaseException, url: str | os.PathLike, *, lock_left: bool = False
) -> StoreUnavailableError:
    """One line naming the store, the fault, and what to do (``lock_left``: the
    writer's lock object could not be removed, so the next run must break it)."""
    again = "run the same command again"
    if lock_left:
        again += " with --break-lock (this writer's lock could not be removed)"
    if isinstance(err, StoreUnavailableError):
        if not lock_left:
            return err
        err = err.__cause__ or err
    cause = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno is not None), err)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = "no space left on its device; free space (or pass another --store)"
    elif isinstance(cause, OSError) and cause.errno == errno.EROFS:
        what = "its file system is read-only; pass a writable --store"
    elif isinstance(cause, OSError) and cause.errno in _PATH_ERRNOS:
        what = f"permission denied ({cause.filename}); make it writable for this user"
    else:
        what = f"its endpoint cannot be reached ({type(cause).__name__}: {cause}); check the connection"
    return StoreUnavailableError(
        f"{url}: the store cannot be used: {what}, then {again} (what is stored is kept)"
    )


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _names_store(err: OSError, url: str | os.PathLike) -> bool:
    if is_remote(url):
        return False
    root = canonical_url(url)
    return any(
        f is not None and os.path.realpath(os.fspath(f)).startswith(root)
        for f in (err.filename, err.filename2)
    )


class OrphanedConnectionErrors:
    """A :mod:`logging` filter for asyncio's logger that drops "Task exception was
    never retrieved" records of connection errors: once an endpoint is lost, the
    HTTP client's own abandoned write tasks print one traceback each, and the
    command has already said what happened in one line. The CLI installs it."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and is_connection_error(exc))


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a network client's connection error."""
    return any(
        isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in _CONNECTION_ERRORS
        for e in _chain(err)
    )
