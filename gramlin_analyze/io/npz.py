"""NumPy ``.npz`` archives (``np.savez`` / ``np.savez_compressed``).

An ``.npz`` is a zip of ``.npy`` members, one per array. Shapes and dtypes
come from each member's ``.npy`` header without reading the array bytes;
an array is read on request. Pickled object arrays are refused, as
``np.load(allow_pickle=False)`` would.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from gramlin_analyze.errors import CheckpointFormatError
from gramlin_analyze.io.base import CheckpointHandle, CheckpointReader, TensorInfo
from gramlin_analyze.io.remote import RemotePath

__all__ = ["NpzReader"]

_FIX = "re-save or re-copy the checkpoint"


def _unreadable(path: Path, err: Exception) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path}: not a readable .npz archive ({type(err).__name__}: {err}); the file is "
        f"truncated or corrupt; {_FIX}"
    )


def _read_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(stream)
    else:
        # Version 3.0 differs from 2.0 only in encoding the header as UTF-8, which
        # matters only for non-ASCII field names of structured dtypes (refused below).
        shape, _, dtype = npy_format.read_array_header_2_0(stream)
    return tuple(int(s) for s in shape), dtype


def _check_numeric(path: Path, name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise CheckpointFormatError(
            f"{path}: array {name!r} holds Python objects, which load only by unpickling, and "
            "gramlin-analyze never unpickles .npz members; re-save it as a numeric array, "
            "e.g. np.savez(path, **{name: np.asarray(value, dtype=np.float32)})"
        )
    if dtype.kind not in "biufc":
        raise CheckpointFormatError(
            f"{path}: array {name!r} has dtype {dtype.str!r}, not numbers (bool, int, float or "
            "complex); re-save it as a numeric array"
        )


class NpzHandle(CheckpointHandle):
    """An open ``.npz``: the zip directory is read once, members on request."""

    def __init__(self, reader: CheckpointReader, path: os.PathLike | str):
        super().__init__(reader, path)
        self._zip: zipfile.ZipFile | None = None
        self._remote: IO[bytes] | None = None  # the fsspec file a URL's archive reads from
        self._members: dict[str, str] = {}

    def _opened(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                if isinstance(self.path, RemotePath):
                    # zipfile seeks to the central directory, then to each member.
                    self._remote = self.path.open("rb")
                    self._zip = zipfile.ZipFile(self._remote)
                else:
                    self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, EOFError, ValueError) as err:
                raise _unreadable(self.path, err) from err
            self._members = {
                member.removesuffix(".npy"): member
                for member in self._zip.namelist()
                if member.endswith(".npy")
            }
        return self._zip

    def _header(self, member: str) -> tuple[tuple[int, ...], np.dtype]:
        try:
            with self._opened().open(member) as stream:
                return _read_header(stream)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
            raise _unreadable(self.path, err) from err

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            self._opened()
            infos = {}
            for name, member in self._members.items():
                shape, dtype = self._header(member)
                _check_numeric(self.path, name, dtype)
                infos[name] = TensorInfo(name=name, shape=shape, dtype=dtype.name)
            self._tensors = infos
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        archive = self._opened()
        member = self._members.get(name)
        if member is None:
            names = sorted(self._members)
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise KeyError(
                f"no array named {name!r} in {self.path}; it holds {len(names)} arrays "
                f"({shown}); use one of the names list_tensors() returns"
            )
        dtype = self._header(member)[1]
        _check_numeric(self.path, name, dtype)
        try:
            with archive.open(member) as stream:
                arr = npy_format.read_array(stream, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
            raise _unreadable(self.path, err) from err
        return np.ascontiguousarray(arr)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._remote is not None:
            self._remote.close()
            self._remote = None
        super().close()


class NpzReader(CheckpointReader):
    """Reader for NumPy ``.npz`` archives, each array one tensor named by its key.

    Listing reads only the ``.npy`` headers. Arrays are returned as stored,
    assumed already in ``(out, in, *kernel)`` order. Object (pickled) and
    non-numeric arrays raise :class:`~gramlin_analyze.errors.CheckpointFormatError`.
    """

    name = "npz"
    suffixes = (".npz",)
    reads_urls = True

    handle_class = NpzHandle
