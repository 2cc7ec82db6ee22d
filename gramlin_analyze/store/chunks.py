"""Array I/O: one step's chunk, whole small arrays, many nodes at once.

Whole chunks of local, uncompressed arrays (weights, activations, Grams) are
files holding just their values (the Zarr v3 spec's ``bytes`` codec): they
are written and read as files (:mod:`.direct_io`). Everything else goes
through zarr's public API; many small operations (resizes, attribute updates,
whole small arrays, new nodes) run on a few threads together, since each is
mostly waiting on the file system or the network.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from gramlin_analyze.errors import StoreError
from gramlin_analyze.store.direct_io import read_raw_chunk, write_raw_chunk

__all__ = [
    "create_nodes",
    "put_rows",
    "put_step",
    "raw_chunk_path",
    "read_all",
    "read_step",
    "resize_all",
    "update_attributes_all",
    "writable",
    "write_all",
]


def v3_metadata(arr: zarr.Array) -> Any:
    """``arr.metadata`` as Zarr v3's (gramlin stores are Zarr format 3; its class
    lives in zarr's internal modules, so it is not named here)."""
    return arr.metadata


def writable(arr: zarr.Array) -> zarr.Array:
    """``arr`` configured to write every chunk, even one equal to the fill value.

    Zarr skips chunks that are all fill value (NaN here), so an all-NaN
    weight would leave no chunk behind and ``validate`` could not tell it from
    a step that was never written.
    """
    return arr.with_config({"write_empty_chunks": True})


def group_at(parent: zarr.Group, key: str) -> zarr.Group:
    """``parent[key]``, a node the store layout makes a group."""
    node = parent[key]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{parent.path}/{key}: expected a Zarr group, found an array")
    return node


def array_at(parent: zarr.Group, key: str) -> zarr.Array:
    """``parent[key]``, a node the store layout makes an array."""
    node = parent[key]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{parent.path}/{key}: expected a Zarr array, found a group")
    return node


def local_dir(arr: zarr.Array, *, write: bool = True) -> Path | None:
    """The directory of ``arr`` when its chunk files may be used directly: a local
    store (writable when ``write``), zarr v3 and a regular chunk grid without shards."""
    from zarr.storage import LocalStore

    store = arr.store
    if (
        not isinstance(store, LocalStore)
        or (write and store.read_only)
        or arr.metadata.zarr_format != 3
    ):
        return None
    try:
        if arr.shards is not None or not all(isinstance(c, int) for c in arr.chunks):
            return None
    except (NotImplementedError, ValueError, TypeError):
        # zarr raises these from Array.chunks for a grid that is not regular
        # (rectilinear chunks): such arrays go through zarr, not as raw files.
        return None
    return Path(store.root, arr.path)


def raw_chunk_path(arr: zarr.Array, coords: tuple[int, ...]) -> Path | None:
    """The file holding chunk ``coords`` of ``arr``, when that file is just its values.

    That is: a local store (:func:`local_dir`), no filters or compressors and
    a little-endian ``bytes`` serializer (as this store lays out weights,
    activations and Grams), and a fixed-size numeric dtype on a
    little-endian machine. Otherwise None, and callers go through zarr.
    """
    from zarr.codecs import BytesCodec

    root = local_dir(arr)
    if root is None or arr.filters or arr.compressors or not isinstance(arr.serializer, BytesCodec):
        return None
    endian = arr.serializer.endian
    if sys.byteorder != "little" or (
        endian is not None and getattr(endian, "value", endian) != "little"
    ):
        return None
    if arr.dtype.kind not in "biufc":
        return None
    return root / arr.metadata.encode_chunk_key(coords)


def _check_step(arr: zarr.Array, index: int, rows: tuple[int, int] | None = None) -> None:
    """IndexError for a step (or rows ``first..stop`` of it) outside ``arr``: zarr
    clips slices silently, so a write past the end would otherwise be dropped."""
    if not 0 <= index < arr.shape[0]:
        raise IndexError(
            f"step index {index} is outside {arr.path or 'the array'} (length {arr.shape[0]})"
        )
    if rows is not None and not 0 <= rows[0] <= rows[1] <= arr.shape[1]:
        raise IndexError(
            f"rows {rows[0]}..{rows[1]} are outside {arr.path or 'the array'} ({arr.shape[1]} rows)"
        )


def put_step(arr: zarr.Array, index: int, value: np.ndarray) -> None:
    """Write ``value`` as row ``index`` of a step-major array.

    A row that is exactly one chunk of a local uncompressed array goes
    straight to its chunk file (zarr's pipeline would copy it and hop
    through its I/O threads for the same file); anything else through zarr.
    """
    value = np.asarray(value, dtype=arr.dtype)
    _check_step(arr, index)
    if arr.chunks == (1, *arr.shape[1:]) and value.shape == tuple(arr.shape[1:]):
        path = raw_chunk_path(arr, (index,) + (0,) * value.ndim)
        if path is not None:
            write_raw_chunk(path, value)
            return
    arr[index : index + 1] = value[None]


def put_rows(arr: zarr.Array, index: int, first: int, value: np.ndarray) -> None:
    """Write ``value`` as rows ``first:first+len(value)`` of step ``index`` of a
    ``(step, row, ...)`` array; whole chunks straight to their files (see :func:`put_step`)."""
    value = np.asarray(value, dtype=arr.dtype)
    rows = arr.chunks[1]
    _check_step(arr, index, (first, first + len(value)))
    if (
        arr.chunks[0] == 1
        and tuple(arr.chunks[2:]) == tuple(arr.shape[2:]) == value.shape[1:]
        and first % rows == 0
        and len(value) == rows
    ):
        path = raw_chunk_path(arr, (index, first // rows) + (0,) * (value.ndim - 1))
        if path is not None:
            write_raw_chunk(path, value)
            return
    arr[index : index + 1, first : first + len(value)] = value[None]


def read_step(arr: zarr.Array, index: int, out: np.ndarray | None = None) -> np.ndarray:
    """Row ``index`` of a step-major array, decoded into ``out`` when given (a caller
    reading one row after another reuses one buffer); a whole chunk file of a local
    uncompressed array is read straight from its file."""
    if out is None:
        return cast(np.ndarray, arr[index])
    if arr.chunks == (1, *arr.shape[1:]) and out.flags.c_contiguous and 0 <= index < arr.shape[0]:
        path = raw_chunk_path(arr, (index,) + (0,) * out.ndim)
        if path is not None and read_raw_chunk(path, out):
            return out
    from zarr.buffer import default_buffer_prototype

    target = out.reshape((1, *out.shape))  # a view: decoding fills ``out``
    arr.get_basic_selection(
        (slice(index, index + 1),),
        out=default_buffer_prototype().nd_buffer.from_numpy_array(target),
    )
    return out


# -- many small operations together ---------------------------------------------------------

_pool: ThreadPoolExecutor | None = None


def _run_all(calls: Sequence[Any]) -> list:
    """Results of the no-argument ``calls``, run on a few threads (zarr's synchronous
    API is thread-safe); every call ends before the first error is raised."""
    global _pool
    if len(calls) <= 1:
        return [c() for c in calls]
    if _pool is None:
        _pool = ThreadPoolExecutor(8, thread_name_prefix="gramlin-zarr")
    futures = [_pool.submit(c) for c in calls]
    errors = [fut.exception() for fut in futures]
    for err in errors:
        if err is not None:
            raise err
    return [fut.result() for fut in futures]


def _resize_and_write(jobs: list[tuple[zarr.Array, tuple[int, ...], np.ndarray | None]]) -> None:
    """For each ``(array, shape, value)``: resize to ``shape`` (unless it has it), then
    write ``value`` (when given) as the whole array."""
    jobs = [(arr, tuple(shape), value) for arr, shape, value in jobs]
    _run_all([lambda a=a, s=s: a.resize(s) for a, s, _ in jobs if tuple(a.shape) != s])
    _run_all([lambda a=a, v=v: a.__setitem__(slice(None), v) for a, _, v in jobs if v is not None])


def resize_all(pairs: list[tuple[zarr.Array, tuple[int, ...]]]) -> None:
    """Resize many arrays (handles updated in place); arrays of their shape are left alone.

    Shrinking along ``step`` first resets the rows it drops to the fill value
    where they share a chunk with rows it keeps: zarr deletes only whole
    chunks, and a later growth would bring the old values back.
    """
    for arr, shape in pairs:
        n = shape[0]
        if arr.ndim and n < arr.shape[0] and n % arr.chunks[0]:
            stop = min(arr.shape[0], -(-n // arr.chunks[0]) * arr.chunks[0])
            writable(arr)[n:stop] = cast(Any, arr.metadata.fill_value)
    _resize_and_write([(a, tuple(shape), None) for a, shape in pairs])


def write_all(pairs: list[tuple[zarr.Array, np.ndarray]]) -> None:
    """``arr[:] = value`` for many small arrays: the manifest columns, every group's
    ``step`` coordinate, per-layer counts."""
    _resize_and_write([(a, tuple(a.shape), value) for a, value in pairs])


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two small arrays (manifest columns) hold the same values, NaN equal to NaN:
    a column equal to what is stored is not written again (a request on an object store)."""
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def read_all(arrays: list[zarr.Array]) -> list[np.ndarray]:
    """``arr[:]`` of many small arrays."""
    return _run_all([lambda a=a: a[:] for a in arrays])


def update_attributes_all(pairs: list[tuple[zarr.Group | zarr.Array, dict[str, Any]]]) -> None:
    """``node.update_attributes(attrs)`` for many nodes."""
    _run_all([lambda n=n, a=a: n.update_attributes(a) for n, a in pairs])


# -- creating nodes -----------------------------------------------------------------------


def create_nodes(
    store,
    *,
    groups: Sequence[tuple[str, dict[str, Any]]] = (),
    arrays: Sequence[tuple[str, dict[str, Any]]] = (),
    overwrite_groups: bool = False,
) -> None:
    """Create groups, then arrays: ``(path, attributes)`` and ``(path, create_array keywords)``.

    ``overwrite_groups`` replaces groups that exist (and everything under
    them); otherwise an existing one is an error, as in zarr.

    zarr makes every document (and the encoded chunks of ``data``). In a
    local store where none of the nodes exists yet and every parent is a
    group, zarr makes them in a ``MemoryStore`` and each node's own files are
    written here atomically on a few threads: through zarr, a node of a local
    store cost about 2 ms (existence checks of the node and each parent, and
    a write of the parents' documents), and a new capture store creates about 50.
    """
    groups, arrays = list(groups), list(arrays)
    if not groups and not arrays:
        return
    root = _fresh_local_root(store, groups, arrays)
    memory: dict[str, Any]
    target = store if root is None else zarr.storage.MemoryStore(memory := {})
    overwrite = overwrite_groups and root is None
    # Groups first, parents before children (a child's creation makes its missing
    # parents, with no attributes, and a parent made that way is then "in the way");
    # then arrays.
    for depth in sorted({p.count("/") for p, _ in groups}):
        _run_all(
            [
                lambda p=p, a=a: zarr.create_group(
                    target, path=p, zarr_format=3, overwrite=overwrite, attributes=a
                )
                for p, a in groups
                if p.count("/") == depth
            ]
        )
    _run_all(
        [
            lambda p=p, kw=kw: zarr.create_array(target, name=p, zarr_format=3, **kw)
            for p, kw in arrays
        ]
    )
    if root is None:
        return
    # Only each node's own keys: the parents zarr made in memory exist on disk.
    own = tuple(f"{path}/" for path, _ in groups + arrays)
    group_docs = {f"{path}/zarr.json" for path, _ in groups}
    files = {key: buf.as_numpy_array() for key, buf in memory.items() if key.startswith(own)}
    # Groups' documents first: a node is never there before its parent.
    for batch in ([k for k in files if k in group_docs], [k for k in files if k not in group_docs]):
        _run_all([lambda k=k: write_raw_chunk(root / k, files[k]) for k in batch])


def _fresh_local_root(store, groups: list, arrays: list) -> Path | None:
    """The root of a writable local ``store`` where none of the nodes exists and
    every parent is a group (made here or on disk); else None."""
    from zarr.storage import LocalStore

    if not isinstance(store, LocalStore) or store.read_only:
        return None
    root = Path(store.root)
    made = {p for p, _ in groups}
    parents: dict[str, bool] = {}
    for path, _ in groups + arrays:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent not in made and parent not in parents:
            parents[parent] = _is_group_doc(root / parent / "zarr.json")
        if (root / path).exists() or not (parent in made or parents[parent]):
            return None
    return root


def _is_group_doc(path: Path) -> bool:
    """Whether ``path`` is a zarr v3 group's ``zarr.json`` (not an array's: arrays have no children)."""
    try:
        return json.loads(path.read_bytes()).get("node_type") == "group"
    except (OSError, ValueError, AttributeError):
        return False
