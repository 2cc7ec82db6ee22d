"""Keras 3 ``.weights.h5`` files, read with h5py alone (no Keras, no code execution).

``model.save_weights("x.weights.h5")`` writes one HDF5 group per saveable
object, named by its attribute path: ``layers/<layer>/vars/<i>`` for the
layers of a Sequential or functional model, nested ``layers/<model>/layers/
<layer>/vars/<i>`` for sub-models, ``<attribute>/vars/<i>`` for subclassed
models, plus ``optimizer/vars/<i>`` once the model is compiled and trained.
The ``vars`` group of each object stores its variables in creation order
and carries the object's ``name`` as an attribute; no variable names are
stored, so the role of each variable follows from its position and shape.

Naming and orientation
----------------------
A tensor is named by its group path with the ``layers``/``vars`` plumbing
removed and ``/`` turned into ``.`` (``layers/sequential/layers/dense_1`` is
``sequential.dense_1``). In each layer:

* ``vars/0`` with two or more dimensions is the kernel, ``<path>.weight``:
  Dense ``(in, out)`` and Conv ``(*kernel, in, out)`` become
  ``(out, in, *kernel)``; ConvNDTranspose ``(*kernel, out, in)`` becomes
  ``(out, in, *kernel)``; Embedding tables ``(num, dim)`` stay as stored;
  the query/key/value projections of a MultiHeadAttention ``(in, heads,
  dim)`` become ``(heads * dim, in)`` and its output projection ``(heads,
  dim, out)`` becomes ``(out, heads * dim)``.
* ``vars/1`` is ``<path>.bias`` when it is the kernel's output vector
  (attention biases ``(heads, dim)`` are flattened).
* every other variable is ``<path>.vars.<i>`` as stored.

The optimizer's variables are not model weights and are not listed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, cast

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, MissingDependencyError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointReader,
    TensorInfo,
    converted_shape,
    missing_tensor_error,
    to_numpy,
)
from gramlin_analyze.io.limits import check_inflate

__all__ = ["KerasWeightsReader"]

_HINT = "pip install 'gramlin-analyze[keras]'"
# Path components Keras inserts between objects; ``_layer_checkpoint_dependencies``
# is what Keras 2.13-compatible files use instead of ``layers``.
_PLUMBING = frozenset({"layers", "_layer_checkpoint_dependencies"})
_NOT_MODEL = frozenset({"optimizer"})
_ATTENTION_IN = frozenset({"query_dense", "key_dense", "value_dense"})
_ATTENTION_OUT = "output_dense"
_EMBEDDING = re.compile(r"(^|_)emb", re.IGNORECASE)
_CONV_TRANSPOSE = re.compile(r"conv\dd_transpose", re.IGNORECASE)


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as err:
        raise MissingDependencyError(
            f"reading Keras .weights.h5 files needs h5py, which is not installed; {_HINT}"
        ) from err
    return h5py


@dataclass(frozen=True)
class _Entry:
    """Where a listed tensor lives and how it is turned into gramlin order."""

    dataset: str
    info: TensorInfo
    convert: str  # "as_is", "in_out", "out_in_last", "split_out", "split_in", "flatten"


def _shape_after(shape: tuple[int, ...], convert: str) -> tuple[int, ...]:
    if convert == "in_out":
        return converted_shape(shape, "in_out")
    if convert == "out_in_last":
        return (shape[-2], shape[-1], *shape[:-2])
    if convert == "split_out":
        return (prod(shape[1:]), shape[0])
    if convert == "split_in":
        return (shape[-1], prod(shape[:-1]))
    if convert == "flatten":
        return (prod(shape),)
    return shape


def _convert(arr: np.ndarray, convert: str) -> np.ndarray:
    if convert == "in_out":
        return to_numpy(arr, layout="in_out")
    if convert == "out_in_last":
        nk = arr.ndim - 2
        return to_numpy(np.transpose(arr, (nk, nk + 1, *range(nk))))
    if convert == "split_out":
        return to_numpy(arr.reshape(arr.shape[0], -1), layout="in_out")
    if convert == "split_in":
        return to_numpy(arr.reshape(-1, arr.shape[-1]), layout="in_out")
    if convert == "flatten":
        return to_numpy(arr.reshape(-1))
    # to_numpy's ascontiguousarray turns 0-d arrays into 1-d; keep scalars scalar.
    return to_numpy(arr).reshape(arr.shape)


def _layer_roles(key: str, name: str, siblings: set[str], shapes: list[tuple[int, ...]]):
    """``(suffix, convert)`` for each variable of one layer, by position and shape."""
    roles = [(f"vars.{i}", "as_is") for i in range(len(shapes))]
    if not shapes or len(shapes[0]) < 2:
        return roles
    kernel = shapes[0]
    bare = key.lstrip("_")
    in_attention = _ATTENTION_IN | {_ATTENTION_OUT} <= siblings
    bias_shape: tuple[int, ...] = (kernel[-1],)
    if in_attention and bare in _ATTENTION_IN:
        roles[0] = ("weight", "split_out")
        bias_shape = kernel[1:]
    elif in_attention and bare == _ATTENTION_OUT:
        roles[0] = ("weight", "split_in")
    elif _EMBEDDING.search(key) or _EMBEDDING.search(name):
        roles[0] = ("weight", "as_is")
        return roles
    elif len(kernel) >= 3 and (_CONV_TRANSPOSE.search(key) or _CONV_TRANSPOSE.search(name)):
        roles[0] = ("weight", "out_in_last")
        bias_shape = (kernel[-2],)
    else:
        roles[0] = ("weight", "in_out")
    if len(shapes) > 1 and shapes[1] == bias_shape:
        roles[1] = ("bias", "flatten" if len(bias_shape) > 1 else "as_is")
    return roles


def _dtype_name(ds: Any) -> str:
    if ds.attrs.get("dtype") in ("bfloat16", b"bfloat16"):
        return "bfloat16"
    return ds.dtype.name


#: A global heap collection's signature, version 1 and three reserved zero bytes.
_GCOL = b"GCOL\x01\x00\x00\x00"


def _check_global_heaps(path: Path) -> None:
    """Refuse a file whose global heap collections (where HDF5 keeps variable-length
    strings, such as each layer's ``name``) are inconsistent: libhdf5 loops forever
    reading a string from a collection whose object sizes were damaged."""
    import mmap

    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < len(_GCOL):
            return  # h5py reports the file itself
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            at = mm.find(_GCOL)
            while at >= 0:
                if not _heap_consistent(mm, at):
                    raise CheckpointFormatError(
                        f"{path}: the HDF5 global heap at byte {at} is corrupt (its objects do "
                        "not add up to its size); re-save it with model.save_weights()"
                    )
                at = mm.find(_GCOL, at + 1)


def _heap_consistent(mm: Any, at: int) -> bool:
    """Objects (16-byte header, data padded to 8) then the free-space object (index 0,
    whose size is all that is left) fill the collection exactly (HDF5 spec, III.E)."""
    size = int.from_bytes(mm[at + 8 : at + 16], "little")
    end = at + size
    if size < 32 or end > len(mm):
        return False
    pos = at + 16
    while pos + 16 <= end:
        index = int.from_bytes(mm[pos : pos + 2], "little")
        length = int.from_bytes(mm[pos + 8 : pos + 16], "little")
        if index == 0:
            return length == end - pos
        pos += 16 + (length + 7) // 8 * 8
    return pos == end


class KerasWeightsReader(CheckpointReader):
    """Keras 3 weight files written by ``model.save_weights("x.weights.h5")``.

    Reads the HDF5 file with h5py only: no Keras import and no model config,
    so nothing from the file is executed. Shapes and dtypes come from the
    dataset headers; tensor bytes are read on request.

    Notes
    -----
    Tensor names are the layer paths of the file (``sequential.dense_1.weight``),
    which Keras derives from class and attribute names, not the ``name=``
    given to a layer; the given name is stored as the ``name`` attribute of
    each ``vars`` group. Legacy Keras 2 HDF5 files are rejected with a hint.
    See the module docstring for the orientation rules.
    """

    name = "keras"
    suffixes = (".weights.h5",)
    requires = ("h5py",)
    extra = "keras"

    def list_tensors(self, path: str | os.PathLike) -> dict[str, TensorInfo]:
        with self._open_file(path) as f:
            return {name: e.info for name, e in self._entries(f, Path(path)).items()}

    def read_tensor(self, path: str | os.PathLike, name: str) -> np.ndarray:
        with self._open_file(path) as f:
            return self._read(f, self._entries(f, Path(path)), Path(path), name)

    def open(self, path: str | os.PathLike) -> CheckpointHandle:
        return _KerasHandle(self, path)

    def _open_file(self, path: str | os.PathLike) -> Any:
        h5py = _h5py()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such Keras weights file")
        _check_global_heaps(p)
        try:
            return h5py.File(p, "r")
        except OSError as err:
            raise CheckpointFormatError(
                f"{p}: not a readable HDF5 file ({err}); the file is truncated or corrupt, "
                "re-save it with model.save_weights()"
            ) from err

    def _entries(self, f: Any, path: Path) -> dict[str, _Entry]:
        h5py = _h5py()
        entries: dict[str, _Entry] = {}
        try:
            # Even these lookups walk the file's B-trees, which may be damaged.
            legacy = "layer_names" in f.attrs or "model_weights" in f
            if not legacy:
                self._walk(h5py, f, (), path, entries, top=True)
        except CheckpointFormatError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
            # h5py: OSError/KeyError/RuntimeError for damaged B-trees and heaps,
            # ValueError/TypeError for a garbled datatype or dataspace message.
            raise CheckpointFormatError(
                f"{path}: the HDF5 structure cannot be read ({err}); the file is truncated "
                "or corrupt, re-save it with model.save_weights()"
            ) from err
        if legacy:
            raise CheckpointFormatError(
                f"{path}: this is a legacy Keras 2 HDF5 file, not a Keras 3 .weights.h5; "
                "load it in Keras and call model.save_weights('model.weights.h5') to convert it"
            )
        if not entries:
            raise CheckpointFormatError(
                f"{path}: no Keras 3 weights found (no 'vars' groups); "
                "is this a file written by model.save_weights()?"
            )
        return entries

    def _walk(
        self, h5py: Any, group: Any, keys: tuple[str, ...], path: Path, out: dict, *, top: bool
    ) -> None:
        children = []
        for key in group:
            link = group.get(key, getlink=True)
            if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                raise CheckpointFormatError(
                    f"{path}: refusing to follow the HDF5 link at {group.name}/{key}; "
                    "Keras never writes links, so the file was altered"
                )
            children.append(key)
        if "vars" in children and isinstance(group["vars"], h5py.Group):
            self._add_layer(h5py, group, keys, path, out)
        for key in children:
            if key == "vars" or (top and key in _NOT_MODEL):
                continue
            child = group[key]
            if isinstance(child, h5py.Group):
                self._walk(h5py, child, (*keys, key), path, out, top=False)

    def _add_layer(
        self, h5py: Any, group: Any, keys: tuple[str, ...], path: Path, out: dict
    ) -> None:
        vars_group = group["vars"]
        indices = sorted(int(k) for k in vars_group if k.isdigit())
        datasets = [vars_group[str(i)] for i in indices]
        for ds in datasets:
            if not isinstance(ds, h5py.Dataset) or ds.is_virtual:
                raise CheckpointFormatError(
                    f"{path}: {vars_group.name} holds something other than a plain dataset; "
                    "the file was not written by Keras"
                )
        key = keys[-1] if keys else ""
        siblings = set()
        if keys:
            siblings = {k.lstrip("_") for k in group.parent}
        layer_name = vars_group.attrs.get("name", "")
        if isinstance(layer_name, bytes):
            layer_name = layer_name.decode()
        shapes = [tuple(int(s) for s in ds.shape) for ds in datasets]
        roles = _layer_roles(key, str(layer_name), siblings, shapes)
        layer = [k for k in keys if k not in _PLUMBING]
        for i, ds, shape, (suffix, convert) in zip(indices, datasets, shapes, roles, strict=True):
            name = ".".join([*layer, suffix])
            if suffix.startswith("vars."):
                name = ".".join([*layer, f"vars.{i}"])
            layout = "in_out" if convert in ("in_out", "split_out", "split_in") else "out_in"
            info = TensorInfo(name, _shape_after(shape, convert), _dtype_name(ds), layout)
            out[name] = _Entry(ds.name, info, convert)

    def _read(self, f: Any, entries: dict[str, _Entry], path: Path, name: str) -> np.ndarray:
        try:
            entry = entries[name]
        except KeyError:
            raise missing_tensor_error(name, path, list(entries)) from None
        ds = f[entry.dataset]
        # A chunked dataset declares its shape freely (a 1 KB file may claim terabytes
        # of fill value, or gzip a bomb): check before h5py allocates it.
        check_inflate(
            path, math.prod(ds.shape) * ds.dtype.itemsize, path.stat().st_size, f"dataset {name!r}"
        )
        try:
            arr = ds[()]
        except (OSError, ValueError) as err:
            raise CheckpointFormatError(
                f"{path}: reading {name!r} failed ({err}); the file is truncated or corrupt"
            ) from err
        arr = np.asarray(arr)
        if entry.info.dtype == "bfloat16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)
        return _convert(arr, entry.convert)


class _KerasHandle(CheckpointHandle):
    """Keeps the HDF5 file open and its layout parsed while many tensors are read."""

    reader: KerasWeightsReader

    def __init__(self, reader: KerasWeightsReader, path: str | os.PathLike):
        super().__init__(reader, path)
        self._file: Any = None
        self._entries: dict[str, _Entry] | None = None

    def _ensure(self) -> tuple[Any, dict[str, _Entry]]:
        if self._file is None:
            self._file = self.reader._open_file(self.path)
            try:
                self._entries = self.reader._entries(self._file, self.path)
            except BaseException:
                self._file.close()
                self._file = None
                raise
        # _entries is set together with _file.
        return self._file, cast("dict[str, _Entry]", self._entries)

    def list_tensors(self) -> dict[str, TensorInfo]:
        _, entries = self._ensure()
        return {name: e.info for name, e in entries.items()}

    def read_tensor(self, name: str) -> np.ndarray:
        f, entries = self._ensure()
        return self.reader._read(f, entries, self.path, name)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._entries = None
        super().close()
