"""NumPy ``.npz`` archives (``np.savez`` / ``np.savez_compressed``).

An ``.npz`` is a zip of ``.npy`` members, one per array. Shapes and dtypes
come from each member's ``.npy`` header without reading the array bytes;
an array is read on request. Pickled object arrays are refused, as
``np.load(allow_pickle=False)`` would. Before a member is inflated, the sizes
the zip directory and the ``.npy`` header declare are checked against each
other and against the cap of :mod:`gramlin_analyze.io.limits`
(``GRAMLIN_MAX_INFLATE``), so a small archive cannot claim gigabytes.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from numpy.lib import format as npy_format

from gramlin_analyze.errors import CheckpointFormatError, GramlinError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointReader,
    TensorInfo,
    missing_tensor_error,
)
from gramlin_analyze.io.limits import check_zip
from gramlin_analyze.io.remote import RemotePath

__all__ = ["NpzReader"]

_FIX = "re-save or re-copy the checkpoint"
#: What zipfile and zlib raise for a damaged archive or member: a bad directory,
#: a damaged deflate stream, an unknown compression method, an encrypted member.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    OSError,
    NotImplementedError,
    RuntimeError,
)


def _unreadable(path: Path, err: Exception) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path}: not a readable .npz archive ({type(err).__name__}: {err}); the file is "
        f"truncated or corrupt; {_FIX}"
    )


def _read_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and the header's length in bytes of one ``.npy`` member."""
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(stream)
    else:
        # Version 3.0 differs from 2.0 only in encoding the header as UTF-8, which
        # matters only for non-ASCII field names of structured dtypes (refused below).
        shape, _, dtype = npy_format.read_array_header_2_0(stream)
    return tuple(int(s) for s in shape), dtype, stream.tell()


def _check_extent(path: Path, name: str, header: tuple, member_size: int) -> None:
    """The data the header declares fills the member exactly (``np.save`` writes it so);
    anything else is a damaged header, and numpy would allocate what it declares."""
    shape, dtype, offset = header
    declared = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or declared != member_size - offset:
        raise CheckpointFormatError(
            f"{path}: array {name!r} declares shape {shape} of {dtype.name} ({declared} bytes) "
            f"but its member holds {member_size - offset} bytes of data; the file is "
            f"corrupt; {_FIX}"
        )


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
                check_zip(self.path, self._zip, self.path.stat().st_size)
            except GramlinError:  # a refused size, or a bad GRAMLIN_MAX_INFLATE
                self.close()
                raise
            except _ZIP_ERRORS as err:
                self.close()
                raise _unreadable(self.path, err) from err
            self._members = {
                member.removesuffix(".npy"): member
                for member in self._zip.namelist()
                if member.endswith(".npy")
            }
        return self._zip

    def _header(self, name: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of a numeric member whose declared size is consistent."""
        archive = self._opened()
        try:
            with archive.open(member) as stream:
                header = _read_header(stream)
        except _ZIP_ERRORS as err:
            raise _unreadable(self.path, err) from err
        _check_numeric(self.path, name, header[1])
        _check_extent(self.path, name, header, archive.getinfo(member).file_size)
        return header[0], header[1]

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            self._opened()
            infos = {}
            for name, member in self._members.items():
                shape, dtype = self._header(name, member)
                infos[name] = TensorInfo(name=name, shape=shape, dtype=dtype.name)
            self._tensors = infos
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        archive = self._opened()
        member = self._members.get(name)
        if member is None:
            raise missing_tensor_error(name, self.path, list(self._members))
        self._header(name, member)
        try:
            with archive.open(member) as stream:
                arr = npy_format.read_array(stream, allow_pickle=False)
        except _ZIP_ERRORS as err:
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
