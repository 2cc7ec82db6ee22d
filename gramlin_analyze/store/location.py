"""Where a store lives: local paths and fsspec URLs, and one canonical spelling of each."""

from __future__ import annotations

import os
import posixpath

__all__ = ["canonical_url", "is_remote", "zarr_store"]


def is_remote(url: str | os.PathLike) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def canonical_url(url: str | os.PathLike) -> str:
    """One spelling per store: a local path resolved to its real path (symlinks,
    ``..``, relative spellings), a remote URL with its protocol lower-cased and its
    path normalized. Two writers reaching one store take one lock."""
    text = str(url)
    if is_remote(text):
        protocol, _, rest = text.partition("://")
        path = posixpath.normpath(rest).lstrip("/") if rest else ""
        return f"{protocol.lower()}://{path}".rstrip("/")
    return os.path.realpath(os.path.expanduser(text.removeprefix("file://")))


def zarr_store(url: str | os.PathLike, *, storage_options: dict | None = None, read_only=False):
    """A zarr ``Store`` for a local path or any fsspec URL."""
    url = str(url)
    if is_remote(url):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    from zarr.storage import LocalStore

    return LocalStore(url.removeprefix("file://"), read_only=read_only)
