"""Checkpoints behind an fsspec URL (``s3://``, ``gs://``, ``memory://``...).

:class:`RemotePath` gives discovery and the readers the few ``Path``
operations they use (names, parents, listing, ``stat``, ``open``) on an
fsspec filesystem, plus :meth:`RemotePath.read_range` for formats that read
byte ranges (safetensors headers and tensors) instead of whole objects.
``file://`` URLs and plain paths stay local ``Path`` objects.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

__all__ = ["RemotePath", "RemoteStat", "as_path", "is_url"]


def is_url(path: object) -> bool:
    """Whether ``path`` names an object behind an fsspec URL (``file://`` is local)."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str | os.PathLike):
        return False
    text = os.fspath(path)
    return isinstance(text, str) and "://" in text and not text.startswith("file://")


def as_path(path: Any, storage_options: dict | None = None) -> Path | RemotePath:
    """A local ``Path``, or a :class:`RemotePath` for a URL (opened with ``storage_options``)."""
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:
        return RemotePath(text, storage_options)
    return Path(text)


@dataclass(frozen=True, slots=True)
class RemoteStat:
    """The fields of ``os.stat_result`` that discovery reads, from an object's listing."""

    st_size: int
    st_mtime: float
    st_mtime_ns: int
    st_ino: int = 0
    st_dev: int = 0


def _mtime(info: dict[str, Any]) -> float:
    """Modification time of a listed object: S3's ``LastModified``, else what the fs gives."""
    for key in ("LastModified", "mtime", "created", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


class RemotePath:
    """An object or prefix on an fsspec filesystem, used like a read-only ``Path``.

    ``str()`` and ``os.fspath()`` give the URL, so tasks receive a string
    they turn back into a ``RemotePath`` with the run's storage options.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, fs: Any = None):
        import fsspec

        self.protocol = url.partition("://")[0].lower()
        self.storage_options = dict(storage_options or {})
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(url, **self.storage_options)
        self.fs = fs
        self.key = str(fs._strip_protocol(url)).rstrip("/") or "/"

    def _child(self, key: str) -> RemotePath:
        return RemotePath(f"{self.protocol}://{key.lstrip('/')}", self.storage_options, fs=self.fs)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key.lstrip('/')}"

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __truediv__(self, name: str) -> RemotePath:
        return self._child(posixpath.join(self.key, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        return self._child(posixpath.dirname(self.key))

    def relative_to(self, other: object) -> PurePosixPath:
        base = other.key if isinstance(other, RemotePath) else None
        if base is None or not (self.key == base or self.key.startswith(base.rstrip("/") + "/")):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(posixpath.relpath(self.key, base))

    def is_relative_to(self, other: object) -> bool:
        try:
            self.relative_to(other)
        except ValueError:
            return False
        return True

    def as_posix(self) -> str:
        return self.url

    def exists(self) -> bool:
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.key))

    def stat(self) -> RemoteStat:
        info = self.fs.info(self.key)
        mtime = _mtime(info)
        return RemoteStat(st_size=int(info["size"]), st_mtime=mtime, st_mtime_ns=int(mtime * 1e9))

    def files(self) -> list[RemotePath]:
        """Every object under this prefix (itself when it is one), sorted."""
        if self.is_file():
            return [self]
        return sorted(self._child(k) for k in self.fs.find(self.key))

    def rglob(self, pattern: str) -> list[RemotePath]:
        """Every object under this prefix; only ``"*"`` is supported (what readers use)."""
        if pattern != "*":
            raise ValueError(f"RemotePath.rglob supports only '*', not {pattern!r}")
        return [f for f in self.files() if f != self]

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        if mode != "rb":
            raise ValueError(f"{self}: checkpoints are opened read-only ('rb'), not {mode!r}")
        return self.fs.open(self.key, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.key))

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` in one ranged request."""
        return bytes(self.fs.cat_file(self.key, start=start, end=end))
