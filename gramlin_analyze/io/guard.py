"""Every failure inside a reader becomes one clear error naming the checkpoint.

Readers word the failures they foresee themselves; the framework libraries
under them raise whatever their parsers hit on a damaged file (``zlib.error``,
``TypeError``, ``UnicodeDecodeError``, ``RecursionError``...). The reader
base classes run every public method of every reader and handle, built-in or
third-party, through :func:`guarded`, so a damaged file costs its own step
and never the run. Special files (FIFOs, devices, sockets) and dangling links
are refused before any reader opens them: opening a FIFO blocks forever.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Callable
from typing import Any

from gramlin_analyze.errors import (
    CheckpointFormatError,
    CheckpointReadError,
    GramlinError,
    MissingTensorError,
)

__all__ = ["guarded", "special_file", "check_source", "translate"]

#: errnos that say the file cannot be read, as opposed to its content being damaged.
_ACCESS_ERRNOS = frozenset(
    getattr(errno, n)
    for n in (
        "ENOENT", "EACCES", "EPERM", "EIO", "EISDIR", "ENOTDIR", "ELOOP", "ENAMETOOLONG",
        "ENXIO", "ENODEV", "ESTALE", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "EHOSTUNREACH",
    )
    if hasattr(errno, n)
)  # fmt: skip

_KINDS = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def special_file(path: str | os.PathLike) -> str | None:
    """What makes a local path unreadable as a checkpoint without opening it: a dangling
    link or a special file (described in words), or None for files, directories and
    paths that do not exist (the reader reports those)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a dangling symbolic link (to {os.readlink(os.fspath(path))!r}, which does not exist)"
        return None
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    via = f"a symbolic link to {os.path.realpath(path)}, " if os.path.islink(path) else ""
    return f"{via}a {kind}, not a regular file"


def check_source(path: Any) -> None:
    """Refuse a local special file or dangling link before anything opens it."""
    if not isinstance(path, str | os.PathLike) or "://" in os.fspath(path):
        return  # URLs (RemotePath) are objects in a store, never special files
    kind = special_file(path)
    if kind is not None:
        raise CheckpointReadError(
            f"{path}: {kind}; it was not opened (reading it could block or never end); "
            "point gramlin-analyze at the checkpoint file itself"
        )


def _what(action: str, tensor: object) -> str:
    return {
        "list": "listing its tensors",
        "read": f"reading tensor {tensor!r}",
        "metadata": "reading its metadata",
        "open": "opening it",
        "files": "listing its files",
        "guess": "recognizing its format",
        "close": "closing it",
    }.get(action, action)


def translate(
    err: Exception, *, path: object, reader: str, action: str, tensor: object = None
) -> GramlinError:
    """The project error for an exception a reader let through (``GramlinError`` as is)."""
    if isinstance(err, GramlinError):
        return err
    what = _what(action, tensor)
    if action == "read" and isinstance(err, KeyError) and tensor is not None:
        if str(tensor) in str(err):  # the reader protocol: KeyError means "no such tensor"
            return MissingTensorError(str(err.args[0]) if err.args else f"{tensor} not in {path}")
    if isinstance(err, OSError) and (err.errno in _ACCESS_ERRNOS or _is_connection(err)):
        return CheckpointReadError(
            f"{path}: {what} failed: the file cannot be read ({err}); check that it exists and "
            "is readable (or that its remote endpoint is reachable), then run again"
        )
    if isinstance(err, MemoryError):
        return CheckpointFormatError(
            f"{path}: {what} ran out of memory; the file declares more data than fits, or "
            "is corrupt; re-save or re-copy the checkpoint"
        )
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no message"
    return CheckpointFormatError(
        f"{path}: {what} with the {reader} reader failed ({type(err).__name__}: {reason}); "
        "the file is truncated, corrupt or not of this format; re-save or re-copy the "
        "checkpoint (--debug shows where it failed)"
    )


def _is_connection(err: BaseException) -> bool:
    return isinstance(err, ConnectionError | TimeoutError)


def guarded(fn: Callable[..., Any], action: str, *, on_handle: bool) -> Callable[..., Any]:
    """``fn`` (a reader or handle method) raising only project errors.

    Reader methods take the checkpoint's path first (and the tensor name for
    ``read``); handle methods use ``self.path``. Reader methods that open the
    file first refuse special files (:func:`check_source`).
    """
    if getattr(fn, "__gramlin_guarded__", False):
        return fn
    opens = not on_handle and action in ("list", "read", "metadata", "open")

    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        path = self.path if on_handle else (args[0] if args else kwargs.get("path"))
        tensor = None
        if action == "read":
            rest = args if on_handle else args[1:]
            tensor = rest[0] if rest else kwargs.get("name")
        try:
            if opens:
                check_source(path)
            return fn(self, *args, **kwargs)
        except Exception as err:
            translated = translate(
                err, path=path, reader=_reader_name(self), action=action, tensor=tensor
            )
            if translated is err:
                raise
            raise translated from err

    method.__gramlin_guarded__ = True  # type: ignore[attr-defined]
    return method


def _reader_name(obj: Any) -> str:
    reader = getattr(obj, "reader", obj)
    return getattr(reader, "name", "") or type(reader).__name__


#: Method name -> action, for readers and for handles.
READER_METHODS = {
    "guess_can_read": "guess",
    "list_tensors": "list",
    "read_tensor": "read",
    "read_metadata": "metadata",
    "open": "open",
    "files": "files",
}
HANDLE_METHODS = {
    "list_tensors": "list",
    "read_tensor": "read",
    "read_metadata": "metadata",
    "close": "close",
}


def guard_class(cls: type, *, on_handle: bool) -> None:
    """Wrap the reader (or handle) methods ``cls`` itself defines with :func:`guarded`."""
    methods = HANDLE_METHODS if on_handle else READER_METHODS
    for attr, action in methods.items():
        fn = cls.__dict__.get(attr)
        if callable(fn):
            setattr(cls, attr, guarded(fn, action, on_handle=on_handle))
