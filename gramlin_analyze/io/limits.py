"""How many bytes a checkpoint may declare that it decompresses to or allocates.

A compressed member (an ``.npz`` array, a deflated zip entry, a gzip HDF5
dataset) or a declared array shape can ask for far more memory than the file
holds: a 2 MB ``.npz`` of zeros inflates to 2.2 GB. Readers compare declared
sizes with :func:`inflate_limit` before they allocate or decompress anything.

The cap on one tensor or member is ``max(64 MiB, 100 x the checkpoint's size
on disk)``: trained weights compress less than 2x, so only decompression
bombs and corrupt size fields reach it. For trusted files that compress
better (a run initialized with zeros), set the environment variable
``GRAMLIN_MAX_INFLATE`` to another ratio (``GRAMLIN_MAX_INFLATE=5000``) or to
``off``; with ``--workers`` or a cluster it must be set where the workers run.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

from gramlin_analyze.errors import DecompressionLimitError, UsageError

__all__ = ["ENV", "DEFAULT_RATIO", "FLOOR", "inflate_limit", "check_inflate", "check_zip"]

ENV = "GRAMLIN_MAX_INFLATE"
DEFAULT_RATIO = 100.0
FLOOR = 64 * 2**20


def _ratio() -> float | None:
    """The ratio from the environment; None when the cap is off."""
    text = os.environ.get(ENV, "").strip().lower()
    if not text:
        return DEFAULT_RATIO
    if text in ("off", "none", "inf", "0"):
        return None
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not ratio > 0:
        raise UsageError(
            f"{ENV}={os.environ[ENV]!r}: expected a positive ratio of decompressed bytes to "
            f"file size (default {DEFAULT_RATIO:g}) or 'off'"
        )
    return ratio


def inflate_limit(stored_bytes: int) -> int | None:
    """The most bytes one tensor (or member) of a checkpoint of ``stored_bytes`` may
    declare; None when ``GRAMLIN_MAX_INFLATE=off``."""
    ratio = _ratio()
    if ratio is None:
        return None
    return max(FLOOR, int(ratio * max(int(stored_bytes), 0)))


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def check_inflate(path: Any, declared: int, stored_bytes: int, what: str) -> None:
    """Raise :class:`DecompressionLimitError` when ``what`` declares more bytes than the
    cap allows for a checkpoint of ``stored_bytes`` on disk."""
    limit = inflate_limit(stored_bytes)
    if declared < 0:
        raise DecompressionLimitError(
            f"{path}: {what} declares a negative size ({declared}); the file is corrupt; "
            "re-save or re-copy the checkpoint"
        )
    if limit is not None and declared > limit:
        raise DecompressionLimitError(
            f"{path}: {what} declares {_size(declared)} from a file of {_size(stored_bytes)}, "
            f"more than the limit of {_size(limit)} (max(64 MiB, {_ratio():g} x file size)) "
            "that guards against decompression bombs and corrupt size fields; if you trust "
            f"the file, raise it with the environment variable {ENV}=<ratio> (or {ENV}=off)"
        )


def check_zip(
    path: Any, members: zipfile.ZipFile | list[zipfile.ZipInfo], stored_bytes: int
) -> None:
    """Every member of a zip archive within the cap, by the sizes its directory declares
    (zipfile never inflates a member past its declared size)."""
    infos = members.infolist() if isinstance(members, zipfile.ZipFile) else members
    for info in infos:
        check_inflate(path, info.file_size, stored_bytes, f"zip member {info.filename!r}")
