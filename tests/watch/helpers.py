"""Shared by the watch tests: comparing two stores array by array, and checkpoint files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from gramlin_analyze.io.discovery import scan
from gramlin_analyze.io.fingerprint import fingerprint_files

#: root attributes that say when, not what
TIMESTAMPS = {"created_at", "modified_at", "consolidated_current"}


def arrays(store: Path) -> dict[str, zarr.Array]:
    """Every array of a store by its path."""
    out: dict[str, zarr.Array] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                walk(node, f"{prefix}{name}/")
            else:
                out[f"{prefix}{name}"] = node

    walk(zarr.open_group(store, mode="r"), "")
    return out


def assert_same_store(store: Path, ref: Path) -> None:
    """The same arrays, dtypes, values (bit for bit, NaN where NaN) and attributes, the
    root's timestamps aside."""
    got, want = arrays(store), arrays(ref)
    assert sorted(got) == sorted(want)
    for path, a in got.items():
        b = want[path]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        x, y = a[...], b[...]
        if x.dtype.kind == "f":
            assert np.array_equal(x.view(f"u{x.dtype.itemsize}"), y.view(f"u{y.dtype.itemsize}")), (
                path
            )
        else:
            assert np.array_equal(x, y), path
        assert dict(a.attrs) == dict(b.attrs), path
    ra = {k: v for k, v in zarr.open_group(store, mode="r").attrs.items() if k not in TIMESTAMPS}
    rb = {k: v for k, v in zarr.open_group(ref, mode="r").attrs.items() if k not in TIMESTAMPS}
    assert ra == rb


def assert_fingerprints_final(store: Path, directory: Path) -> None:
    """Every manifest row names a checkpoint of the finished run with its final
    fingerprint: no version of a file but the last was ever stored."""
    g = zarr.open_group(store, mode="r")
    rows = dict(zip(g["steps/source_path"][:], g["steps/fingerprint"][:], strict=True))
    final = {str(s.path): s for s in scan(directory)}
    assert set(rows) == set(final)
    for path, fp in rows.items():
        s = final[path]
        root = s.path if s.path.is_dir() else s.path.parent
        assert fp == fingerprint_files(s.files, root), path
    assert set(g["steps/status"][:]) == {"ok"}


def age(path: Path, seconds: float) -> None:
    """Set a file's mtime ``seconds`` in the past (a file written that long ago)."""
    t = Path(path).stat().st_mtime - seconds
    os.utime(path, (t, t))
