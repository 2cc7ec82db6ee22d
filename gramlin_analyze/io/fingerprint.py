"""Content fingerprints and stat keys of checkpoint files (no tensor is parsed).

A fingerprint tells a changed checkpoint from an unchanged one by sampled
bytes; a stat key tells whether a file was rewritten since it was hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from gramlin_analyze.io.remote import RemotePath

__all__ = ["stat_key", "fingerprint_files"]

_SAMPLE = 64 * 1024
_N_SAMPLES = 16


def stat_key(files: list[Path], stats: list[os.stat_result]) -> str:
    """A short key of the files' names, sizes, mtimes (ns) and inodes.

    Not a fingerprint (copying a run changes it): a cache key. When a file's
    key equals the one stored with its fingerprint, the file was not
    rewritten since, and hashing it again is skipped.
    """
    h = hashlib.blake2b(digest_size=12)
    for f, st in zip(files, stats, strict=True):
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}\n".encode())
    return h.hexdigest()


def fingerprint_files(files: list[Path], root: Path | None = None) -> str:
    """A content fingerprint that tells a changed checkpoint from an unchanged one.

    Hashing every byte costs as much as reading the file (longer than copying
    it), so the fingerprint is blake2b over each file's size and 16 evenly
    spaced 64 KiB samples (all of a file up to 1 MiB). Training rewrites
    essentially every weight, so a changed checkpoint changes the samples;
    renaming or copying a run does not change its fingerprint (mtime is
    deliberately not part of it).
    """
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        rel = f.relative_to(root) if root is not None and f.is_relative_to(root) else Path(f.name)
        size = f.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        for chunk in _samples(f, size):
            h.update(chunk)
    return "blake2b-sampled:" + h.hexdigest()


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges a fingerprint hashes: all of a small file, else
    16 evenly spaced samples."""
    if size <= _SAMPLE * _N_SAMPLES:
        return [(0, size)]
    stride = (size - _SAMPLE) // (_N_SAMPLES - 1)
    return [(i * stride, i * stride + _SAMPLE) for i in range(_N_SAMPLES)]


def _samples(f: Path, size: int) -> Iterator[bytes]:
    """The sampled bytes of ``f``: ranged reads behind a URL, seeks in a local file
    (the same bytes, so a checkpoint's fingerprint does not depend on where it lives)."""
    if isinstance(f, RemotePath):
        for start, end in _sample_ranges(size):
            yield f.read_range(start, end)
        return
    with open(f, "rb") as fh:
        for start, end in _sample_ranges(size):
            fh.seek(start)
            yield fh.read(end - start)
