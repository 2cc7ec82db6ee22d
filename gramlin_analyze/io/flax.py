"""Flax parameter trees serialized with ``flax.serialization.to_bytes``.

The bytes are msgpack with Flax's extension types for arrays; they are
decoded with ``flax.serialization.msgpack_restore``, which builds nested
dicts of NumPy arrays and never executes code from the file.

Naming and orientation (shared with the orbax reader)
-----------------------------------------------------
Tree paths are joined with ``.``; a leading ``params`` collection is dropped
(``params/Dense_0/kernel`` is ``Dense_0.weight``), other collections keep
their name (``batch_stats.BatchNorm_0.mean``). Leaves:

* ``kernel`` is ``<path>.weight``: Dense ``(in, out)`` and Conv/ConvTranspose
  ``(*kernel, in, out)`` become ``(out, in, *kernel)``. In an attention module
  (children ``query``, ``key``, ``value`` and ``out`` with 3-d kernels, as
  ``nn.MultiHeadDotProductAttention`` makes them) the projections ``(in,
  heads, dim)`` become ``(heads * dim, in)`` and ``out`` ``(heads, dim,
  out)`` becomes ``(out, heads * dim)``; their ``(heads, dim)`` biases are
  flattened.
* ``embedding`` is ``<path>.weight``, kept ``(num, dim)``.
* ``bias`` is ``<path>.bias``; every other leaf keeps its name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

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

__all__ = ["FlaxMsgpackReader"]

_HINT = "pip install 'gramlin-analyze[jax]'"
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "bias": "bias"}
_ATTENTION_IN = frozenset({"query", "key", "value"})
_ATTENTION = _ATTENTION_IN | {"out"}


@dataclass(frozen=True)
class TreeLeaf:
    """One array of a parameter tree: its path, gramlin name and conversion."""

    path: tuple[str, ...]
    info: TensorInfo
    convert: str  # "as_is", "in_out", "split_out", "split_in", "flatten"


def _shape_after(shape: tuple[int, ...], convert: str) -> tuple[int, ...]:
    if convert == "in_out":
        return converted_shape(shape, "in_out")
    if convert == "split_out":
        return (prod(shape[1:]), shape[0])
    if convert == "split_in":
        return (shape[-1], prod(shape[:-1]))
    if convert == "flatten":
        return (prod(shape),)
    return shape


def convert_leaf(arr: Any, convert: str) -> np.ndarray:
    """A tree leaf as NumPy in ``(out, in, *kernel)`` order (see :class:`TreeLeaf`)."""
    arr = np.asarray(arr)
    if convert == "in_out":
        return to_numpy(arr, layout="in_out")
    if convert == "split_out":
        return to_numpy(arr.reshape(arr.shape[0], -1), layout="in_out")
    if convert == "split_in":
        return to_numpy(arr.reshape(-1, arr.shape[-1]), layout="in_out")
    if convert == "flatten":
        return to_numpy(arr.reshape(-1))
    # to_numpy's ascontiguousarray turns 0-d arrays into 1-d; keep scalars scalar.
    return to_numpy(arr).reshape(arr.shape)


def _role(
    path: tuple[str, ...], shape: tuple[int, ...], attention_parents: set[tuple[str, ...]]
) -> tuple[str, str]:
    """``(leaf name, conversion)`` of one leaf."""
    leaf = path[-1]
    module = path[:-1]
    in_attention = len(module) >= 1 and module[:-1] in attention_parents
    if in_attention and module[-1] in _ATTENTION:
        if leaf == "kernel":
            return "weight", "split_out" if module[-1] in _ATTENTION_IN else "split_in"
        if leaf == "bias":
            return "bias", "flatten" if len(shape) > 1 else "as_is"
    if leaf == "kernel" and len(shape) >= 2:
        return "weight", "in_out"
    return _LEAF_NAMES.get(leaf, leaf), "as_is"


def _attention_parents(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> set[tuple[str, ...]]:
    """Modules whose ``query/key/value/out`` children hold 3-d attention kernels."""
    children: dict[tuple[str, ...], set[str]] = {}
    for path, shape in shapes.items():
        if len(path) >= 2 and path[-1] == "kernel" and len(shape) == 3:
            children.setdefault(path[:-2], set()).add(path[-2])
    return {parent for parent, names in children.items() if _ATTENTION <= names}


def tree_leaves(
    items: Iterable[tuple[tuple[str, ...], tuple[int, ...], str]], *, source: Path
) -> list[TreeLeaf]:
    """Gramlin names and conversions for ``(path, shape, dtype)`` of every array.

    A leading ``params`` collection is dropped from the names unless that
    would make two names equal. ``source`` is the checkpoint, for messages.
    """
    items = [(tuple(str(k) for k in p), tuple(int(s) for s in shape), d) for p, shape, d in items]
    parents = _attention_parents({p: s for p, s, _ in items})
    named = []
    for path, shape, dtype in items:
        leaf, convert = _role(path, shape, parents)
        named.append((path, (*path[:-1], leaf), shape, dtype, convert))
    stripped = [n[1:] if len(n) > 1 and n[0] == "params" else n for _, n, *_ in named]
    names = [".".join(n) for n in stripped]
    if len(set(names)) != len(names):
        names = [".".join(n) for _, n, *_ in named]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointFormatError(
            f"{source}: several leaves map to the same tensor name ({', '.join(dup)}), "
            "e.g. a 'kernel' next to a 'weight'; rename one of them before saving"
        )
    leaves = []
    for name, (path, _, shape, dtype, convert) in zip(names, named, strict=True):
        layout = "in_out" if convert in ("in_out", "split_out", "split_in") else "out_in"
        leaves.append(
            TreeLeaf(path, TensorInfo(name, _shape_after(shape, convert), dtype, layout), convert)
        )
    return leaves


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flatten(value, (*prefix, str(key)))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten(value, (*prefix, str(i)))
    else:
        yield prefix, tree


class FlaxMsgpackReader(CheckpointReader):
    """Flax parameters saved as msgpack bytes (``flax.serialization.to_bytes``).

    The whole file is decoded at once (msgpack has no index), so use
    :meth:`open` to read many tensors: the handle decodes the file once.

    Notes
    -----
    See the module docstring for names (``Dense_0.weight``) and orientation.
    """

    name = "flax"
    suffixes = (".msgpack", ".flax")
    requires = ("flax",)
    extra = "jax"

    def list_tensors(self, path: str | os.PathLike) -> dict[str, TensorInfo]:
        return {leaf.info.name: leaf.info for leaf in self._load(path)[0].values()}

    def read_tensor(self, path: str | os.PathLike, name: str) -> np.ndarray:
        leaves, arrays = self._load(path)
        return _read(leaves, arrays, Path(path), name)

    def open(self, path: str | os.PathLike) -> CheckpointHandle:
        return _FlaxHandle(self, path)

    def _load(
        self, path: str | os.PathLike
    ) -> tuple[dict[str, TreeLeaf], dict[tuple[str, ...], np.ndarray]]:
        try:
            from flax.serialization import msgpack_restore
        except ImportError as err:
            raise MissingDependencyError(
                f"reading Flax .msgpack files needs flax, which is not installed; {_HINT}"
            ) from err
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such Flax checkpoint file")
        data = p.read_bytes()
        try:
            tree = msgpack_restore(data)
        except Exception as err:
            # msgpack reports truncation and garbage as ValueError, ExtraData,
            # FormatError, StackError or TypeError depending on where it stops.
            raise CheckpointFormatError(
                f"{p}: not a Flax msgpack checkpoint ({type(err).__name__}: {err}); the file "
                "is truncated or corrupt, re-save it with flax.serialization.to_bytes(params)"
            ) from err
        if not isinstance(tree, Mapping) or not tree:
            raise CheckpointFormatError(
                f"{p}: decodes to {type(tree).__name__}, not a parameter tree; "
                "is this a file written by flax.serialization.to_bytes(params)?"
            )
        arrays: dict[tuple[str, ...], np.ndarray] = {}
        for key, value in _flatten(tree):
            if isinstance(value, (np.ndarray, np.generic)):
                arrays[key] = np.asarray(value)
        if not arrays:
            raise CheckpointFormatError(
                f"{p}: the msgpack tree holds no arrays; "
                "is this a file written by flax.serialization.to_bytes(params)?"
            )
        leaves = tree_leaves(((k, a.shape, a.dtype.name) for k, a in arrays.items()), source=p)
        return {leaf.info.name: leaf for leaf in leaves}, arrays


def _read(
    leaves: dict[str, TreeLeaf], arrays: dict[tuple[str, ...], np.ndarray], path: Path, name: str
) -> np.ndarray:
    try:
        leaf = leaves[name]
    except KeyError:
        raise missing_tensor_error(name, path, list(leaves)) from None
    return convert_leaf(arrays[leaf.path], leaf.convert)


class _FlaxHandle(CheckpointHandle):
    """Decodes the msgpack file once and serves every tensor from memory."""

    reader: FlaxMsgpackReader

    def __init__(self, reader: FlaxMsgpackReader, path: str | os.PathLike):
        super().__init__(reader, path)
        self._loaded: tuple[dict[str, TreeLeaf], dict[tuple[str, ...], np.ndarray]] | None = None

    def _ensure(self) -> tuple[dict[str, TreeLeaf], dict[tuple[str, ...], np.ndarray]]:
        if self._loaded is None:
            self._loaded = self.reader._load(self.path)
        return self._loaded

    def list_tensors(self) -> dict[str, TensorInfo]:
        return {name: leaf.info for name, leaf in self._ensure()[0].items()}

    def read_tensor(self, name: str) -> np.ndarray:
        leaves, arrays = self._ensure()
        return _read(leaves, arrays, self.path, name)

    def close(self) -> None:
        self._loaded = None
        super().close()
