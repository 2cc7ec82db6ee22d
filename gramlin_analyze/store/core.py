"""The gramlin store: a Zarr v3 hierarchy that xarray opens as a DataTree.

Only this package knows the on-disk layout (see ``layout.py`` and
``schemas/``). Writers hold the store lock (``lock.py``); readers never block.

Consolidated metadata is written deliberately (Zarr v3 warns that it is not
yet in the v3 spec; we silence that one warning at the write, because without
it ``xarray.open_datatree`` warns on every open and lists every group over the
network): once per command, after the structural changes and before the
tasks, which find their arrays in it. The root attribute
``consolidated_current`` is false from a writer's first structural change to
its closing write, so a store left by a killed writer is consolidated by the
next one.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from gramlin_analyze._version import __version__
from gramlin_analyze.errors import StoreError, UsageError
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.lock import StoreLock, is_remote

__all__ = ["GramlinStore", "zarr_store"]

_BIG_MOVE_BYTES = 64 * 2**20

#: Root attribute: false while a writer may have changed the structure since the
#: consolidated metadata was written (see :meth:`GramlinStore.structure_changed`).
CONSOLIDATED_ATTR = "consolidated_current"
#: The first version that keeps CONSOLIDATED_ATTR. Every writer stamps its version
#: (``creation_library_version``) as its first write; an older writer leaves the
#: attribute as it found it, so it is trusted only after a writer that keeps it.
_CONSOLIDATED_ATTR_SINCE = (0, 2, 0)


def _version_tuple(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split(".")[:3])
    except ValueError:
        return ()


def consolidated_is_current(attrs: dict[str, Any]) -> bool:
    """Whether root ``attrs`` vouch that the consolidated copy is current."""
    return attrs.get(CONSOLIDATED_ATTR) is True and _version_tuple(
        attrs.get("creation_library_version")
    ) >= _CONSOLIDATED_ATTR_SINCE


def zarr_store(url: str | os.PathLike, *, storage_options: dict | None = None, read_only=False):
    """A zarr ``Store`` for a local path or any fsspec URL."""
    url = str(url)
    if is_remote(url):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    from zarr.storage import LocalStore

    return LocalStore(url.removeprefix("file://"), read_only=read_only)


_task_roots: dict[tuple[str, str], zarr.Group] = {}
_task_nodes: dict[tuple[str, str, str], zarr.Group | zarr.Array] = {}
_task_roots_lock = threading.Lock()


def writable(arr: zarr.Array) -> zarr.Array:
    """``arr`` configured to write every chunk, even one equal to the fill value.

    Zarr skips chunks that are all fill value (NaN here), so an all-NaN
    weight would leave no chunk behind and ``validate`` could not tell it from
    a step that was never written.
    """
    return arr.with_config({"write_empty_chunks": True})


def _local_dir(arr: zarr.Array, *, write: bool = True) -> Path | None:
    """The directory of ``arr`` when this module may use its files directly:
    a local store (writable when ``write``), zarr v3 metadata and a regular
    chunk grid. Otherwise None, and callers go through zarr."""
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.storage import LocalStore

    store, md = arr.store, arr.metadata
    if (
        not isinstance(store, LocalStore) or (write and store.read_only) or md.zarr_format != 3
        or not isinstance(md.chunk_grid, RegularChunkGrid)
    ):
        return None
    return Path(store.root, arr.path)


def raw_chunk_path(arr: zarr.Array, coords: tuple[int, ...]) -> Path | None:
    """The file holding chunk ``coords`` of ``arr``, when that file is just its values.

    That is: a writable local store, zarr v3 metadata whose only codec is
    little-endian ``bytes`` (no compression, no sharding, no filters, as this
    store lays out weights, activations and Grams), a regular chunk grid and
    a fixed-size numeric dtype on a little-endian machine. Otherwise None, and
    callers write through zarr.
    """
    from zarr.codecs import BytesCodec

    root = _local_dir(arr)
    md = arr.metadata
    if root is None:
        return None
    codecs = md.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs[0].endian
    if sys.byteorder != "little" or (endian is not None and getattr(endian, "value", endian) != "little"):
        return None
    if arr.dtype.kind not in "biufc":
        return None
    return root / md.encode_chunk_key(coords)


def write_raw_chunk(path: Path, data: np.ndarray) -> None:
    """Write one chunk's bytes atomically, as zarr's local store does (temp file, rename).

    Chunks of at least :data:`DIRECT_IO_MIN_BYTES` bypass the page cache
    (``O_DIRECT``, see :func:`_write_direct`) where the file system allows
    it; ``GRAMLIN_DIRECT_IO=0`` turns that off.
    """
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    try:
        _write_replacing(path, view)
    except FileNotFoundError:
        # A new directory, made only now: a mkdir before every write (a failing
        # system call and an exception when it exists) was a fifth of the file
        # system's time in setting up a store.
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_replacing(path, view)


def _write_replacing(path: Path, view: memoryview) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        if not _write_direct(tmp, view):
            with tmp.open("wb") as f:
                f.write(view)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- direct I/O -------------------------------------------------------------------------

#: Chunks this large or larger are written with ``O_DIRECT`` (when enabled and supported).
DIRECT_IO_MIN_BYTES = 1 << 20
_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the logical block size
_STAGING_BYTES = 8 << 20  # per thread: the aligned buffer unaligned data is copied through
_direct_unsupported: set[int] = set()  # st_dev of file systems that refused O_DIRECT
_staging = threading.local()


def direct_io_enabled() -> bool:
    """Whether large chunk writes may bypass the page cache (``GRAMLIN_DIRECT_IO``, default on)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("GRAMLIN_DIRECT_IO", "1").strip().lower() not in (
        "0", "off", "false", "no",
    )


def _staging_buffer() -> memoryview:
    buf = getattr(_staging, "buf", None)
    if buf is None:
        import mmap

        buf = _staging.buf = mmap.mmap(-1, _STAGING_BYTES)  # page-aligned, reused by this thread
    return memoryview(buf)


def _write_direct(tmp: Path, view: memoryview) -> bool:
    """Write ``view`` to the new file ``tmp`` with ``O_DIRECT``; False when not done.

    Why: a store is written once and read later, often larger than memory.
    Through the page cache every chunk is copied into cache pages that the
    kernel must then write back, and that evict the user's working set; on
    virtual machines whose guest memory is backed lazily, filling new cache
    pages also costs about 2.5 ms per MB of CPU. ``O_DIRECT`` hands the
    buffer to the device instead: writing the 550 MB of a capture took 0.25 s
    of CPU instead of 0.8 s (plus 0.3 s of ``sync``) on the development VM.

    ``O_DIRECT`` needs offsets, lengths and memory aligned to the device's
    block size: the aligned part of a page-aligned array goes to the device
    as is, anything else through a per-thread aligned staging buffer; the
    last block is padded with zeros and the file truncated to its true
    length. File systems that refuse ``O_DIRECT`` (tmpfs, some network
    file systems) are remembered and written through the page cache.
    """
    n = view.nbytes
    if n < DIRECT_IO_MIN_BYTES or not direct_io_enabled():
        return False
    try:
        dev = os.stat(tmp.parent).st_dev
    except OSError:
        return False
    if dev in _direct_unsupported:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        _direct_unsupported.add(dev)
        return False
    try:
        if not _direct_accepted(dev, lambda: _pwrite_aligned(fd, view)):
            # Alignment this device does not accept: written through the page cache.
            os.close(fd)
            fd = -1
            with tmp.open("wb") as f:
                f.write(view)
            return True
        os.ftruncate(fd, n)
    finally:
        if fd >= 0:
            os.close(fd)
    return True


def _direct_accepted(dev: int, transfer: Callable[[], None]) -> bool:
    """Run a direct transfer: True when done, False (``dev`` then remembered as
    refusing ``O_DIRECT``) when the device rejects it (EINVAL: alignment or flags)."""
    try:
        transfer()
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        _direct_unsupported.add(dev)
        return False
    return True


def _pwrite_aligned(fd: int, view: memoryview) -> None:
    n = view.nbytes
    off = 0
    addr = np.frombuffer(view, dtype=np.uint8).ctypes.data if n else 0
    if addr % _ALIGN == 0:  # zero-copy: the whole blocks straight from the array
        whole = n - n % _ALIGN
        while off < whole:
            off += os.pwrite(fd, view[off:whole], off)
    stage = _staging_buffer()
    while off < n:
        k = min(n - off, len(stage))
        stage[:k] = view[off : off + k]
        padded = -(-k // _ALIGN) * _ALIGN
        if padded > k:
            stage[k:padded] = bytes(padded - k)
        done = 0
        while done < padded:
            done += os.pwrite(fd, stage[done:padded], off + done)
        off += k


def read_raw_chunk(path: Path, out: np.ndarray) -> bool:
    """Fill ``out`` with the bytes of the chunk file ``path``; False to let zarr read it.

    Large chunks are read with ``O_DIRECT``, like they are written (see
    :func:`_write_direct`): a chunk written that way is not in the page cache,
    and a buffered read would fill new cache pages with it (on the
    development VM the costliest part of reading it). A missing file (the
    chunk reads as the fill value) or one of another size is left to zarr.
    """
    view = memoryview(out).cast("B")
    n = view.nbytes
    direct = n >= DIRECT_IO_MIN_BYTES and direct_io_enabled()
    try:
        dev = os.stat(path.parent).st_dev if direct else None
        if dev in _direct_unsupported:
            direct = False
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except FileNotFoundError:
        return False
    except OSError as err:
        if not direct or err.errno != errno.EINVAL:
            raise
        _direct_unsupported.add(dev)
        return read_raw_chunk(path, out)
    try:
        if os.fstat(fd).st_size != n:
            return False
        if direct:
            if not _direct_accepted(dev, lambda: _pread_aligned(fd, view)):
                # Opened with O_DIRECT but this alignment refused: read through the cache from now on.
                os.close(fd)
                fd = -1
                return read_raw_chunk(path, out)
        else:
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], got)
                if k <= 0:
                    raise OSError(f"{path}: short read ({got} of {n} bytes)")
                got += k
    finally:
        if fd >= 0:
            os.close(fd)
    return True


def _pread_aligned(fd: int, view: memoryview) -> None:
    n = view.nbytes
    off = 0
    if np.frombuffer(view, dtype=np.uint8).ctypes.data % _ALIGN == 0:  # straight into ``out``
        whole = n - n % _ALIGN
        while off < whole:
            k = os.preadv(fd, [view[off:whole]], off)
            if k <= 0:
                raise OSError(f"short read ({off} of {n} bytes)")
            off += k
    stage = _staging_buffer()
    while off < n:
        want = min(-(-(n - off) // _ALIGN) * _ALIGN, len(stage))
        k = os.preadv(fd, [stage[:want]], off)
        if k <= 0:
            raise OSError(f"short read ({off} of {n} bytes)")
        k = min(k, n - off)
        view[off : off + k] = stage[:k]
        off += k


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array on page-aligned memory (direct I/O reads and writes it without a copy)."""
    import mmap

    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(_ALIGN, count * dtype.itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _check_step(arr: zarr.Array, index: int, rows: tuple[int, int] | None = None) -> None:
    """IndexError for a step (or rows ``first..stop`` of it) outside ``arr``: zarr
    clips slices silently, so a write past the end would otherwise be dropped."""
    if not 0 <= index < arr.shape[0]:
        raise IndexError(f"step index {index} is outside {arr.path or 'the array'} (length {arr.shape[0]})")
    if rows is not None and not 0 <= rows[0] <= rows[1] <= arr.shape[1]:
        raise IndexError(f"rows {rows[0]}..{rows[1]} are outside {arr.path or 'the array'} ({arr.shape[1]} rows)")


def put_step(arr: zarr.Array, index: int, value: np.ndarray) -> None:
    """Write ``value`` as row ``index`` of a step-major array.

    When the row is exactly one chunk of a local, uncompressed array (weights
    and Grams here: chunks of one step), its bytes go straight to the chunk
    file (:func:`raw_chunk_path`): zarr's codec pipeline would copy them and
    hop through its I/O threads for the same file, about a tenth of
    ``analyze --metrics gram``. Otherwise zarr writes it, keeping the step
    axis so that a value covering whole chunks is encoded without zarr's
    fill-and-copy of a partial chunk.
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
    ``(step, row, ...)`` array; whole chunks go straight to their files (see
    :func:`put_step`), anything else through zarr."""
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
    """Row ``index`` of a step-major array, decoded into ``out`` when given.

    ``out`` (shape ``arr.shape[1:]``, ``arr.dtype``, C-contiguous) lets a
    caller that reads one row after another reuse one buffer instead of
    zarr allocating a fresh one per read. A row that is one whole chunk
    file of a local uncompressed array is read straight from its file
    (``O_DIRECT`` when large, see :func:`read_raw_chunk`).
    """
    if out is None:
        return arr[index]
    if arr.chunks == (1, *arr.shape[1:]) and out.flags.c_contiguous and 0 <= index < arr.shape[0]:
        path = raw_chunk_path(arr, (index,) + (0,) * out.ndim)
        if path is not None and read_raw_chunk(path, out):
            return out
    from zarr.core.buffer import default_buffer_prototype

    target = out.reshape((1, *out.shape))  # a view: decoding fills ``out``
    arr.get_basic_selection((slice(index, index + 1),), out=default_buffer_prototype().nd_buffer.from_numpy_array(target))
    return out


def _gather(coros: list) -> list:
    """Run coroutines on zarr's event loop together; their results in order.

    One round trip for many small metadata or chunk operations instead of one
    after another (on an object store, tens of ms each).
    """
    import asyncio

    from zarr.core.sync import sync

    async def run() -> list:
        return await asyncio.gather(*coros)

    return list(sync(run())) if coros else []


#: Arrays up to this many bytes (in memory) are read and written whole by
#: :func:`_small_codecs`'s path: the manifest, coordinates, per-(step, layer) scalars.
SMALL_ARRAY_BYTES = 4 << 20


def _small_codecs(arr: zarr.Array, *, write: bool) -> list | None:
    """The codecs of ``arr`` when its chunks can be encoded or decoded here, in
    the calling thread, by zarr's own codec objects; otherwise None.

    For small arrays of a local store: zarr's path costs 0.5 ms per read and
    1 ms per write (a coroutine on its I/O thread, a thread hop per codec and
    per file, and a read of the old chunk before every partial-chunk write),
    and a new step rewrites about 50 of them. The bytes are the same: the
    codecs' own synchronous encoders and decoders make them.
    """
    from zarr.abc.codec import ArrayBytesCodec, BytesBytesCodec

    if _local_dir(arr, write=write) is None or arr.nbytes > SMALL_ARRAY_BYTES:
        return None
    codecs = list(arr.metadata.codecs)
    if not codecs or not isinstance(codecs[0], ArrayBytesCodec):
        return None
    if not all(isinstance(c, BytesBytesCodec) for c in codecs[1:]):
        return None
    if not all(hasattr(c, "_encode_sync") and hasattr(c, "_decode_sync") for c in codecs):
        return None
    return codecs


def _chunk_slices(arr: zarr.Array):
    """``(chunk key, selection in the array, selection in the chunk)`` of every chunk."""
    import itertools

    md = arr.metadata
    cs = md.chunk_grid.chunk_shape
    grid = [range(-(-n // c)) for n, c in zip(arr.shape, cs, strict=True)]
    for coords in itertools.product(*grid):
        sel = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, cs, arr.shape, strict=True))
        yield md.encode_chunk_key(coords), sel, tuple(slice(0, x.stop - x.start) for x in sel)


def _chunk_spec(arr: zarr.Array):
    from zarr.core.buffer import default_buffer_prototype

    md = arr.metadata
    return md.get_chunk_spec((0,) * len(arr.shape), arr.async_array.config, default_buffer_prototype())


def _write_small(arr: zarr.Array, value: np.ndarray, codecs: list) -> None:
    """``arr[:] = value`` through zarr's codecs, in this thread (see :func:`_small_codecs`).

    Chunks are padded with the fill value; one that is all fill value is
    removed instead of written, as zarr does unless ``write_empty_chunks``.
    """
    spec = _chunk_spec(arr)
    native = arr.metadata.dtype.to_native_dtype()
    value = np.broadcast_to(np.asarray(value, dtype=native), arr.shape)
    root = _local_dir(arr)
    for key, sel, inner in _chunk_slices(arr):
        block = np.full(spec.shape, spec.fill_value, dtype=native)
        block[inner] = value[sel]
        path = root / key
        nd = spec.prototype.nd_buffer.from_numpy_array(block)
        if not spec.config.write_empty_chunks and nd.all_equal(spec.fill_value):  # zarr's test (bitwise for 0.0)
            path.unlink(missing_ok=True)
            continue
        buf = codecs[0]._encode_sync(nd, spec)
        for c in codecs[1:]:
            buf = c._encode_sync(buf, spec)
        write_raw_chunk(path, buf.as_numpy_array())


def _read_small(arr: zarr.Array, codecs: list) -> np.ndarray:
    """``arr[:]`` through zarr's codecs, in this thread; missing chunks read as the fill value."""
    spec = _chunk_spec(arr)
    out = np.full(arr.shape, spec.fill_value, dtype=arr.metadata.dtype.to_native_dtype())
    root = _local_dir(arr, write=False)
    for key, sel, inner in _chunk_slices(arr):
        try:
            raw = (root / key).read_bytes()
        except FileNotFoundError:
            continue
        buf = spec.prototype.buffer.from_bytes(raw)
        for c in reversed(codecs[1:]):
            buf = c._decode_sync(buf, spec)
        block = codecs[0]._decode_sync(buf, spec).as_numpy_array()
        out[sel] = block.reshape(spec.shape)[inner]
    return out


def _growable(arr: zarr.Array, shape: tuple[int, ...]) -> bool:
    """Whether :func:`_grow_local` can resize ``arr`` to ``shape``: its files are
    local and writable (:func:`_local_dir`) and no dimension shrinks (nothing to delete)."""
    return (
        _local_dir(arr) is not None and len(shape) == len(arr.shape)
        and all(n >= o for n, o in zip(shape, arr.shape, strict=True))
    )


def _grow_local(arr: zarr.Array, shape: tuple[int, ...]) -> None:
    """Grow ``arr`` (see :func:`_growable`) by writing its ``zarr.json`` directly.

    What zarr's ``resize`` does when no dimension shrinks (new metadata,
    written atomically, the handle updated in place), without its coroutine
    and I/O-thread round trip per array: a new step resizes every array of a
    store (about 60 for 8 layers).
    """
    from zarr.core.buffer import default_buffer_prototype

    md = arr.metadata.update_shape(tuple(shape))
    for key, buf in md.to_buffer_dict(default_buffer_prototype()).items():
        write_raw_chunk(_local_dir(arr) / key, buf.as_numpy_array())
    object.__setattr__(arr.async_array, "metadata", md)


_small_pool = None


def _small_io_pool():
    """Threads for the metadata and small-array files of :func:`_resize_and_write`:
    most of a file replace is the file system's journal, not CPU, so they overlap."""
    global _small_pool
    if _small_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _small_pool = ThreadPoolExecutor(4, thread_name_prefix="gramlin-small-io")
    return _small_pool


def _resize_and_write(jobs: list[tuple[zarr.Array, tuple[int, ...], np.ndarray | None]]) -> None:
    """For each ``(array, shape, value)`` at once: resize to ``shape`` (unless it
    has it), then write ``value`` (when given) as the whole array.

    Arrays of a local store that grow (or keep their shape) and are small are
    done here, on threads (:func:`_grow_local`, :func:`_write_small`); the
    rest through zarr, concurrently on its event loop.
    """
    here, rest = [], []
    for arr, shape, value in jobs:
        shape = tuple(shape)
        grow = tuple(arr.shape) != shape
        local = (not grow or _growable(arr, shape)) and (value is None or _small_codecs(arr, write=True) is not None)
        (here if local else rest).append((arr, shape, value))

    def local_job(arr: zarr.Array, shape: tuple[int, ...], value: np.ndarray | None) -> None:
        if tuple(arr.shape) != shape:
            _grow_local(arr, shape)
        if value is not None:
            codecs = _small_codecs(arr, write=True)
            if codecs is None:  # grew past SMALL_ARRAY_BYTES
                arr[:] = value
            else:
                _write_small(arr, value, codecs)

    async def one(arr: zarr.Array, shape: tuple[int, ...], value: np.ndarray | None) -> None:
        if tuple(arr.shape) != shape:
            await arr.async_array.resize(shape)
        if value is not None:
            await arr.async_array.setitem(slice(None), value)

    futures = [_small_io_pool().submit(local_job, *job) for job in here]
    try:
        _gather([one(*job) for job in rest])
    finally:
        errors = [fut.exception() for fut in futures]
    for err in errors:
        if err is not None:
            raise err


def resize_all(pairs: list[tuple[zarr.Array, tuple[int, ...]]]) -> None:
    """Resize many arrays at once (their metadata writes issued together); arrays
    already of their shape are left alone. A store has a few arrays per layer."""
    _resize_and_write([(a, tuple(shape), None) for a, shape in pairs])


def write_all(pairs: list[tuple[zarr.Array, np.ndarray]]) -> None:
    """``arr[:] = value`` for many small arrays at once (their writes issued together):
    the manifest columns, every group's ``step`` coordinate, per-layer counts."""
    _resize_and_write([(a, tuple(a.shape), value) for a, value in pairs])


def create_nodes(
    store,
    *,
    groups: list[tuple[str, dict[str, Any]]] = (),
    arrays: list[tuple[str, dict[str, Any]]] = (),
    overwrite_groups: bool = False,
) -> None:
    """Create groups, then arrays: ``(path, attributes)`` and ``(path, create_array keywords)``.

    ``overwrite_groups`` replaces groups that exist (and everything under
    them), as ``create_group(overwrite=True)``; otherwise an existing one is
    an error, as in zarr.

    zarr makes the documents (and the encoded chunks of ``data``). In a local
    store where none of the nodes exists yet and every parent is a group,
    zarr makes them in memory and they are written here, each file atomically
    as zarr's local store writes it, on a few threads. Through zarr, creating
    a node of a local store cost about 2 ms: existence checks of the node and
    each parent and a write of the parents' documents, each a thread hop from
    its event loop; a new capture store creates about 50. Otherwise (another
    store, a node to overwrite, a missing parent) zarr does it all, with the
    groups' creations issued together, then the arrays'.
    """
    from zarr.api import asynchronous as za
    from zarr.storage import LocalStore, MemoryStore

    groups, arrays = list(groups), list(arrays)
    if not groups and not arrays:
        return
    root = Path(store.root) if isinstance(store, LocalStore) and not store.read_only else None
    paths = [p for p, _ in groups + arrays]
    if root is not None:
        made = {p for p, _ in groups}
        parents: dict[str, bool] = {}
        for path in paths:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent not in made and parent not in parents:
                parents[parent] = _is_group_doc(root / parent / "zarr.json")
            if (root / path).exists() or not (parent in made or parents[parent]):
                root = None
                break
    if root is None:
        _gather([
            za.create_group(store=store, path=path, zarr_format=3, overwrite=overwrite_groups, attributes=attrs)
            for path, attrs in groups
        ])
        _gather([za.create_array(store, name=path, zarr_format=3, **kw) for path, kw in arrays])
        return
    memory: dict[str, Any] = {}
    mem = MemoryStore(memory)
    # Groups first: an array's creation makes its missing parents, with no attributes.
    _gather([za.create_group(store=mem, path=path, zarr_format=3, attributes=attrs) for path, attrs in groups])
    _gather([za.create_array(mem, name=path, zarr_format=3, **kw) for path, kw in arrays])
    # Only each node's own keys: the parents zarr made in memory exist on disk.
    own = tuple(f"{path}/" for path in paths)
    group_docs = {f"{path}/zarr.json" for path, _ in groups}
    files = {key: buf.as_numpy_array() for key, buf in memory.items() if key.startswith(own)}
    # Groups' documents first: a node is never there before its parent.
    for batch in ([k for k in files if k in group_docs], [k for k in files if k not in group_docs]):
        futures = [_small_io_pool().submit(write_raw_chunk, root / key, files[key]) for key in batch]
        errors = [fut.exception() for fut in futures]  # every write ends before one is reported
        for err in errors:
            if err is not None:
                raise err


def _is_group_doc(path: Path) -> bool:
    """Whether ``path`` is a zarr v3 group's ``zarr.json`` (not an array's: arrays have no children)."""
    try:
        return json.loads(path.read_bytes()).get("node_type") == "group"
    except (OSError, ValueError, AttributeError):
        return False


def read_all(arrays: list[zarr.Array]) -> list[np.ndarray]:
    """``arr[:]`` of many small arrays at once (their reads issued together)."""
    codecs = [_small_codecs(a, write=False) for a in arrays]
    rest = [a for a, c in zip(arrays, codecs, strict=True) if c is None]
    got = iter(_gather([a.async_array.getitem(slice(None)) for a in rest]))
    return [_read_small(a, c) if c is not None else next(got) for a, c in zip(arrays, codecs, strict=True)]


class ConsolidatedGroup(zarr.Group):
    """A group opened from consolidated metadata, whose lookups skip zarr's event loop.

    ``group[path]`` on a consolidated group is a dictionary lookup, but zarr
    runs it as a coroutine on its I/O thread: about 0.3 ms per lookup, more
    while other threads keep that thread busy, and a command makes dozens.
    Here it is a plain call. Subgroups are of this class too.
    """

    def __getitem__(self, path: str) -> zarr.Array | zarr.Group:
        from zarr.core.group import AsyncGroup

        ag = self._async_group
        if ag.metadata.consolidated_metadata is None or not hasattr(ag, "_getitem_consolidated"):
            return super().__getitem__(path)
        node = ag._getitem_consolidated(ag.store_path / path, path, prefix=ag.name)
        return ConsolidatedGroup(node) if isinstance(node, AsyncGroup) else zarr.Array(node)

    def __contains__(self, path: object) -> bool:
        try:
            self[str(path)]
        except KeyError:
            return False
        return True


def open_consolidated(zstore, mode: str) -> ConsolidatedGroup:
    """The root of ``zstore`` from its consolidated metadata (see :class:`ConsolidatedGroup`)."""
    return ConsolidatedGroup(zarr.open_group(zstore, mode=mode, zarr_format=3, use_consolidated=True)._async_group)


def open_for_tasks(url: str, storage_options: dict | None, token: str) -> zarr.Group:
    """The store's root for a writer task, opened once per process and run.

    The driver consolidates metadata after every structural change and before
    it starts tasks, so tasks can navigate groups from the consolidated copy in
    memory instead of reading a ``zarr.json`` per lookup (which cost several
    ms per task). ``token`` identifies the run: a new run reopens.
    """
    key = (url, token)
    root = _task_roots.get(key)
    if root is None:
        with _task_roots_lock:  # a process's task threads start together: one of them opens
            root = _task_roots.get(key)
            if root is None:
                root = open_consolidated(zarr_store(url, storage_options=storage_options), "r+")
                share_with_tasks(url, token, root)
    return root


def share_with_tasks(url: str, token: str, root: zarr.Group) -> None:
    """Make ``root`` (the consolidated copy, current) what :func:`open_for_tasks` returns for run ``token``.

    The driver calls it with the view it already holds, so tasks on threads
    of its own process start without parsing the consolidated metadata again
    (several ms per thread, all threads at once at the start of a run).
    """
    _task_roots.clear()
    _task_nodes.clear()
    _task_roots[(url, token)] = root


def task_node(url: str, storage_options: dict | None, token: str, path: str) -> zarr.Group | zarr.Array:
    """The group or array at ``path`` for a writer task, looked up once per process and run.

    Each lookup builds a new zarr object from its metadata (about 0.4 ms);
    a task touches several, and a run has thousands of tasks. Nodes are
    cached with the root of :func:`open_for_tasks` and dropped with it.
    """
    root = open_for_tasks(url, storage_options, token)
    key = (url, token, path)
    node = _task_nodes.get(key)
    if node is None:
        node = _task_nodes[key] = root[path]
    return node


_compact_lock = threading.Lock()
_compact_users = 0
_compact_saved: Any = None


@contextmanager
def compact_metadata() -> Iterator[None]:
    """Write ``zarr.json`` documents as compact JSON while a command runs.

    zarr indents them by default (its ``json_indent`` setting), which makes
    Python's JSON encoder take its pure-Python path: the root document holds
    the consolidated metadata of every node, and a writer rewrites it a few
    times per command (9 ms each with indentation, 4 ms without, for 8
    layers). Readers parse either. zarr's setting is process-wide, so
    overlapping commands (threads) count: the last one out restores it.
    """
    global _compact_users, _compact_saved
    with _compact_lock:
        if _compact_users == 0:
            _compact_saved = zarr.config.get("json_indent")
            zarr.config.set({"json_indent": None})
        _compact_users += 1
    try:
        yield
    finally:
        with _compact_lock:
            _compact_users -= 1
            if _compact_users == 0:
                zarr.config.set({"json_indent": _compact_saved})


@contextmanager
def _quiet_consolidated() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class GramlinStore:
    """Handle on one store.

    Parameters
    ----------
    url
        Local path or fsspec URL (``s3://bucket/run.zarr``).
    mode
        ``"r"`` to read, ``"a"`` to create or update (take the lock with
        :meth:`lock` before writing).
    storage_options
        Passed to fsspec for remote stores.
    """

    def __init__(self, url: str | os.PathLike, *, mode: str = "r", storage_options: dict | None = None):
        self.url = str(url)
        self.mode = mode
        self.storage_options = storage_options or {}
        self._steps_arrays: dict[str, zarr.Array] | None = None
        self._man: dict[str, np.ndarray] | None = None  # a writer's copy of the manifest
        self._stale = False  # this writer changed the structure since it last consolidated
        self._consolidated = False  # this writer wrote the consolidated copy
        self._view: zarr.Group | None = None
        self._zstore = zarr_store(url, storage_options=storage_options, read_only=mode == "r")
        try:
            if mode == "r":
                self.root = zarr.open_group(self._zstore, mode="r", zarr_format=3, use_consolidated=False)
            else:
                self.root = zarr.open_group(self._zstore, mode="a", zarr_format=3, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise StoreError(
                f"{self.url}: not a gramlin store (no Zarr group there); create one with "
                "`gramlin-analyze ingest DIR --store " + self.url + "`"
            ) from err
        # The last writer stopped midway through a structural change (only
        # writers since 0.2.0 clear the flag, and they set it only while changing the structure).
        self._interrupted = mode != "r" and self.root.attrs.get(CONSOLIDATED_ATTR) is False
        if mode == "r" and "gramlin_schema_version" not in self.root.attrs:
            raise StoreError(f"{self.url}: a Zarr group, but not a gramlin store (no gramlin_schema_version)")

    # -- lifecycle -------------------------------------------------------------------

    def lock(self, *, break_lock: bool = False) -> StoreLock:
        return StoreLock(self.url, storage_options=self.storage_options, break_lock=break_lock)

    def initialize(self, *, source: str, run_name: str | None = None) -> None:
        """Write root attributes and the empty ``/steps`` group if they are missing."""
        attrs = dict(self.root.attrs)
        if "gramlin_schema_version" not in attrs:
            self.root.update_attributes(
                {
                    "gramlin_schema_version": L.SCHEMA_VERSION,
                    "created_at": _now(),
                    "creation_library": "gramlin-analyze",
                    "creation_library_version": __version__,
                    "source": str(source),
                    "run_name": run_name or os.path.basename(str(source).rstrip("/")) or "run",
                    "title": "gramlin-analyze checkpoint store",
                }
            )
        groups: list[tuple[str, dict[str, Any]]] = []
        arrays: list[tuple[str, dict[str, Any]]] = []
        if L.STEPS not in self.view:
            groups.append((L.STEPS, {"description": "manifest: one row per ingested checkpoint"}))
            arrays.append((f"{L.STEPS}/step", self._step_coord_spec(np.zeros(0, np.int64))))
            arrays.extend((f"{L.STEPS}/{name}", self._manifest_spec(name, 0)) for name in L.MANIFEST)
        else:
            present = dict(self.view[L.STEPS].arrays())  # from the consolidated copy when current
            n = present["step"].shape[0]
            missing = [name for name in L.MANIFEST if name not in present]
            if missing:  # stores from older versions gain new fields
                arrays.extend((f"{L.STEPS}/{name}", self._manifest_spec(name, n)) for name in missing)
                self._man = None  # read again, with the new columns
        if L.LAYERS not in self.view:
            groups.append((L.LAYERS, {"description": "one group per layer"}))
        if groups or arrays:
            self.structure_changed()
            create_nodes(self._zstore, groups=groups, arrays=arrays)

    def consolidate(self) -> None:
        """Rewrite the consolidated copy of every node's metadata."""
        self._steps_arrays = None
        with _quiet_consolidated():
            zarr.consolidate_metadata(self._zstore, zarr_format=3)
        self._stale = False
        self._consolidated = True
        self._view = None
        self.root = zarr.open_group(self._zstore, mode="a" if self.mode != "r" else "r",
                                    zarr_format=3, use_consolidated=False)

    # Consolidation is deferred: a writer changes the structure (creates or
    # resizes nodes) several times while it sets up, and re-reading every
    # node's metadata after each change cost about 15 ms locally (more on an
    # object store) per change. Instead the first change of a command sets the
    # root attribute ``consolidated_current`` to false (one root write), the
    # structure is consolidated once before the tasks that read it start
    # (:meth:`ensure_consolidated`), and the closing :meth:`touch` sets it
    # back. A writer killed in between leaves it false, so the next writer
    # consolidates first; readers meanwhile see the last consolidated state,
    # which is consistent.

    def structure_changed(self) -> None:
        """Note that nodes are about to be created or resized: the consolidated copy goes stale."""
        self._steps_arrays = None
        view, self._view = self._view, None
        if not self._stale:
            if self.root.attrs.get(CONSOLIDATED_ATTR) is not False:
                # Through the consolidated view when open (it keeps the copy in
                # the root document); self.root is not re-read: from now on this
                # writer consults its own _stale, not the attribute.
                self._stamp({CONSOLIDATED_ATTR: False}, via=view, reopen=False)
            self._stale = True

    def ensure_consolidated(self) -> None:
        """Consolidate when this writer, or an earlier one that stopped midway, changed the structure."""
        if self._stale or not (self._consolidated or consolidated_is_current(dict(self.root.attrs))):
            self.consolidate()

    def touch(self) -> None:
        """Stamp the root with the time and the library version (a writer's last act).

        Written through a handle that holds the root's consolidated metadata,
        so the root keeps it: a reader opening the store before the next
        :meth:`consolidate` sees the last consolidated state, instead of
        falling back (with a warning) to one request per node.
        """
        attrs = {"modified_at": _now(), "creation_library_version": __version__, CONSOLIDATED_ATTR: not self._stale}
        # The open consolidated view already holds the current copy: no need to read it again.
        self._stamp(attrs, via=None if self._stale else self._view)

    def _stamp(self, attrs: dict[str, Any], *, via: zarr.Group | None = None, reopen: bool = True) -> None:
        root = via if via is not None else zarr.open_group(self._zstore, mode="r+", zarr_format=3, use_consolidated=None)
        root.update_attributes(attrs)
        if reopen:
            self.root = zarr.open_group(self._zstore, mode="a", zarr_format=3, use_consolidated=False)

    # -- arrays ----------------------------------------------------------------------

    @staticmethod
    def _step_coord_spec(steps: np.ndarray) -> dict[str, Any]:
        """Keywords creating a group's ``step`` coordinate holding ``steps``."""
        kw: dict[str, Any] = dict(
            chunks=(L.MANIFEST_CHUNK,), dimension_names=["step"], fill_value=-1, overwrite=True,
            attributes={"long_name": "optimizer step", "units": "steps"},
        )
        if len(steps):
            kw["data"] = np.asarray(steps, dtype=np.int64)
        else:
            kw.update(shape=(0,), dtype="int64")
        return kw

    @staticmethod
    def _manifest_spec(name: str, n: int) -> dict[str, Any]:
        """Keywords creating manifest column ``name`` of length ``n``."""
        dtype, fill, long_name, units = L.MANIFEST[name]
        kw: dict[str, Any] = {}
        if dtype is not str:
            kw["fill_value"] = fill
        return dict(
            shape=(n,), dtype=dtype, chunks=(L.MANIFEST_CHUNK,), dimension_names=["step"], overwrite=True,
            attributes={"long_name": long_name, **({"units": units} if units else {})}, **kw,
        )

    def group(self, path: str) -> zarr.Group:
        return self.view[path]

    def steps(self) -> np.ndarray:
        return self.manifest()["step"]

    def _manifest_arrays(self) -> dict[str, zarr.Array]:
        """The arrays of ``/steps`` by name.

        One listing, whose members' metadata zarr fetches concurrently: on an
        object store each lookup by name is a round trip. A writer keeps the
        handles until its next structural change (:meth:`consolidate`): under
        the lock nobody else resizes ``/steps``.
        """
        if self._steps_arrays is not None:
            return self._steps_arrays
        arrays = dict(self.view[L.STEPS].arrays())
        if self.mode != "r":
            self._steps_arrays = arrays
        return arrays

    def manifest(self) -> dict[str, np.ndarray]:
        """The ``/steps`` columns by name (copies).

        A writer keeps them in memory: under the lock only it writes them
        (:meth:`write_rows`, :meth:`set_step_axis` update the copy), so each
        command reads the manifest once.
        """
        if self._man is None:
            arrays = self._manifest_arrays()
            names = ["step"] + [n for n in L.MANIFEST if n in arrays]
            man = {}
            for name, v in zip(names, read_all([arrays[n] for n in names]), strict=True):
                if name == "step":
                    man[name] = np.asarray(v, dtype=np.int64)
                else:
                    man[name] = np.asarray(v, dtype=object) if L.MANIFEST[name][0] is str else np.asarray(v)
            # A writer killed while resizing leaves columns of different lengths:
            # the step coordinate's is the manifest's (extra rows are dropped,
            # missing ones are unset, so never ok); set_step_axis repairs the shapes.
            n = len(man["step"])
            for name, col in man.items():
                if len(col) != n:
                    fill = "" if col.dtype == object else L.MANIFEST[name][1]
                    man[name] = np.concatenate([col[:n], np.full(max(0, n - len(col)), fill, dtype=col.dtype)])
            if self.mode == "r":
                return man
            self._man = man
        return {k: v.copy() for k, v in self._man.items()}

    @property
    def view(self) -> zarr.Group:
        """The root for looking nodes up: the consolidated copy while it is current.

        Each lookup through :attr:`root` reads a ``zarr.json`` (a round trip on
        an object store); through the consolidated copy it is a dictionary
        lookup. Nodes are created through :attr:`root` (after
        :meth:`structure_changed`, from which on this is :attr:`root` too).
        """
        if self._stale or not (self._consolidated or consolidated_is_current(dict(self.root.attrs))):
            return self.root
        if self._view is None:
            self._view = open_consolidated(self._zstore, "r" if self.mode == "r" else "r+")
        return self._view

    def layer_names(self) -> list[str]:
        root = self.view
        if L.LAYERS not in root:
            return []
        return sorted(k for k, _ in root[L.LAYERS].groups())

    def layer(self, name: str) -> zarr.Group:
        return self.view[L.LAYERS][name]

    def _walk(self) -> dict[str, zarr.Array | zarr.Group]:
        """Every node of the store by path, each with its metadata.

        From the consolidated copy when it is current (no read per node: under
        the lock nobody else changes the structure), else one walk of the live
        metadata, each group's members fetched concurrently.
        """
        return dict(self.view.members(max_depth=None))

    @staticmethod
    def _step_nodes(nodes: dict[str, zarr.Array | zarr.Group]) -> tuple[dict[str, zarr.Array], list[zarr.Array]]:
        """Every array whose first dim is ``step`` by path, and every ``step`` coordinate.

        The handles are resized in place, so they stay valid through :meth:`set_step_axis`.
        """
        arrays: dict[str, zarr.Array] = {}
        coords: list[zarr.Array] = []
        for path, node in nodes.items():
            if not isinstance(node, zarr.Array):
                continue
            if path.rsplit("/", 1)[-1] == "step":
                coords.append(node)
            elif (node.metadata.dimension_names or ())[:1] == ("step",):
                arrays[path] = node
        return arrays, coords

    def _consolidate_nodes(self, nodes: dict[str, zarr.Array | zarr.Group]) -> None:
        """Write the consolidated copy from ``nodes`` (every node, metadata current).

        What :func:`zarr.consolidate_metadata` does after reading every node's
        metadata back; :meth:`set_step_axis` has just walked and resized them
        all, so it writes from memory. Falls back to zarr's when its internals
        differ from the version this was written against.
        """
        import dataclasses

        from zarr.core.group import AsyncGroup, ConsolidatedMetadata, GroupMetadata
        from zarr.core.sync import sync

        if not all(hasattr(x, a) for x, a in ((ConsolidatedMetadata, "_flat_to_nested"), (AsyncGroup, "_save_metadata"))):
            self.consolidate()
            return
        flat = {}
        for path, node in nodes.items():
            md = node.metadata
            if isinstance(md, GroupMetadata):  # children are filled in below, from ``nodes``
                md = dataclasses.replace(md, consolidated_metadata=ConsolidatedMetadata(metadata={}))
            flat[path] = md

        async def run() -> AsyncGroup:
            root = await AsyncGroup.open(self.root.store_path, zarr_format=3, use_consolidated=False)
            ConsolidatedMetadata._flat_to_nested(flat)
            md = dataclasses.replace(root.metadata, consolidated_metadata=ConsolidatedMetadata(metadata=flat))
            written = dataclasses.replace(root, metadata=md)
            await written._save_metadata()
            return written

        self._steps_arrays = None
        written = sync(run())
        self._stale = False
        self._consolidated = True
        # What was just written is the view: no need to read and parse it back.
        self._view = ConsolidatedGroup(written)
        self.root = zarr.open_group(self._zstore, mode="a", zarr_format=3, use_consolidated=False)

    # -- the step axis ------------------------------------------------------------------

    def set_step_axis(self, new_steps: np.ndarray, rows: dict[int, dict[str, Any]] | None = None) -> dict[int, int]:
        """Make ``new_steps`` (sorted, unique) the step axis of every group.

        Rows whose status is ``ok`` keep their data: it is moved to the new
        position when steps are inserted before it. A moved row is marked
        ``pending`` before its data moves and ``ok`` only after, so a kill at
        any moment leaves no ``ok`` row pointing at the wrong data. ``rows``
        gives manifest fields by step (as :meth:`write_rows`); fields of new
        steps are written with the axis when steps are only appended (an
        incremental ingest), the others after it. Returns ``{step: index}``.
        """
        pos = self._set_step_axis(np.asarray(new_steps, dtype=np.int64), rows := dict(rows or {}))
        self.write_row_fields([(pos[step], fields) for step, fields in rows.items()])  # what the axis did not take
        return pos

    def _set_step_axis(self, new_steps: np.ndarray, rows: dict[int, dict[str, Any]]) -> dict[int, int]:
        """:meth:`set_step_axis`; the ``rows`` it writes are removed from ``rows``."""
        if np.any(np.diff(new_steps) <= 0):
            raise UsageError("steps must be sorted and unique")
        man = self.manifest()
        old_steps = man["step"]
        status = man["status"]
        n_old, n_new = len(old_steps), len(new_steps)
        pos = {int(s): i for i, s in enumerate(new_steps)}
        moves = {}
        for i, (s, st) in enumerate(zip(old_steps, status, strict=True)):
            if st == "ok" and int(s) in pos and pos[int(s)] != i:
                moves[i] = pos[int(s)]
        same = n_old == n_new and np.array_equal(old_steps, new_steps)
        if same and not self._interrupted:
            return pos
        nodes = self._walk()  # before marking: from the consolidated copy while it is current
        self.structure_changed()
        self._man = None  # rewritten below
        step_arrays, step_coords = self._step_nodes(nodes)
        if self._interrupted:
            # The last writer stopped while resizing: first give every array the
            # manifest's length again, then change the axis as usual.
            resize_all([(a, (n_old, *a.shape[1:])) for a in [*step_arrays.values(), *step_coords] if a.shape[0] != n_old])
            self._interrupted = False
        g = {name: step_arrays[f"{L.STEPS}/{name}"] for name in L.MANIFEST}
        if moves:
            st = np.asarray(status, dtype=object).copy()
            for i in moves:
                st[i] = "pending"
            write_all([(g["status"], st)])
        append = not moves and n_new > n_old and np.array_equal(new_steps[:n_old], old_steps)
        if n_new > n_old and not append:  # appending resizes below, with everything else
            resize_all(
                [(arr, (n_new, *arr.shape[1:])) for arr in step_arrays.values()]
                + [(c, (n_new,)) for c in step_coords]
            )
        manifest_paths = {f"{L.STEPS}/{k}" for k in L.MANIFEST}
        for path, arr in step_arrays.items():
            if path in manifest_paths:
                continue
            self._move_rows(arr, moves)
        # The manifest: permuted rows, new rows pending, moved rows ok last.
        new_man: dict[str, np.ndarray] = {}
        keep = {pos[int(s)]: i for i, s in enumerate(old_steps) if int(s) in pos and status[i] != ""}
        for name, (dtype, fill, _, _) in L.MANIFEST.items():
            old = man.get(name)
            if dtype is str:
                col = np.full(n_new, "", dtype=object)
            else:
                col = np.full(n_new, fill, dtype=np.dtype(dtype))
            if old is not None:
                for j, i in keep.items():
                    col[j] = old[i]
            new_man[name] = col
        for j in range(n_new):
            if j not in keep:
                new_man["status"][j] = "pending"
        final_status = new_man["status"].copy()
        for j in moves.values():
            new_man["status"][j] = "pending"
        if append:
            # Steps appended: old rows keep their place and values, new rows are
            # unset ("" status: not ok) until written, so no order is needed
            # for safety; every array is resized and rewritten in one batch,
            # with the given fields of the new rows (never ok here).
            for step in [st for st in rows if pos[st] >= n_old and rows[st].get("status", "pending") != "ok"]:
                for name, v in rows.pop(step).items():
                    if name not in L.MANIFEST:
                        raise KeyError(f"unknown manifest field {name!r}")
                    new_man[name][pos[step]] = _coerce(name, v)
            _resize_and_write(
                [(arr, (n_new, *arr.shape[1:]), None) for path, arr in step_arrays.items() if path not in manifest_paths]
                + [(g[name], (n_new,), col) for name, col in new_man.items()]
                + [(c, (n_new,), new_steps) for c in step_coords]
            )
            self._man = {"step": new_steps.copy(), **new_man}
            self._consolidate_nodes(nodes)
            return pos
        # Every column but status, together; then status; then the coordinates.
        resize_all([(g[name], (n_new,)) for name in new_man] + [(c, (n_new,)) for c in step_coords])
        write_all([(g[name], col) for name, col in new_man.items() if name != "status"])
        write_all([(g["status"], new_man["status"])])
        write_all([(c, new_steps) for c in step_coords])
        if moves:
            write_all([(g["status"], final_status)])
        if n_new < n_old:
            resize_all([(arr, (n_new, *arr.shape[1:])) for arr in step_arrays.values()])
        new_man["status"] = final_status
        self._man = {"step": new_steps.copy(), **new_man}
        # Only shapes changed, all through ``nodes``: consolidate from them.
        self._consolidate_nodes(nodes)
        return pos

    @staticmethod
    def _move_rows(arr: zarr.Array, moves: dict[int, int]) -> None:
        if not moves:
            return
        if arr.nbytes <= _BIG_MOVE_BYTES:
            data = arr[:]
            out = data.copy()
            for i, j in moves.items():
                out[j] = data[i]
            arr[:] = out
            return
        up = sorted((i for i, j in moves.items() if j > i), reverse=True)
        down = sorted(i for i, j in moves.items() if j < i)
        for i in up + down:
            arr[moves[i]] = arr[i]

    # -- manifest rows ----------------------------------------------------------------

    def write_row_fields(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """:meth:`write_rows` for ``(row index, fields)`` pairs: one call per set of field names."""
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
        for i, fields in rows:
            groups.setdefault(tuple(sorted(fields)), []).append((i, fields))
        for keys, items in groups.items():
            self.write_rows([i for i, _ in items], **{k: [f[k] for _, f in items] for k in keys})

    def write_rows(self, index: int | list[int], **fields: Any) -> None:
        """Write manifest fields of one or more rows; ``status`` is written last.

        Each field is a value for every row, or a sequence with one value per
        row. Columns are rewritten whole: the manifest is small, and one write
        per column beats one read-modify-write per row.
        """
        idx = [index] if isinstance(index, int | np.integer) else list(index)
        if not idx:
            return
        g = self._manifest_arrays()
        man = self.manifest()
        was = man["status"].copy()  # the status column as stored
        cols: dict[str, np.ndarray] = {}
        for name, value in fields.items():
            if name not in L.MANIFEST:
                raise KeyError(f"unknown manifest field {name!r}")
            if isinstance(value, list | tuple | np.ndarray):
                if len(value) != len(idx):
                    raise ValueError(f"{name}: {len(value)} values for {len(idx)} rows")
                values = list(value)
            else:
                values = [value] * len(idx)
            if name == "status" and any(v not in L.STATUSES for v in values):
                raise ValueError(f"bad status in {values!r}")
            col = man[name]
            for i, v in zip(idx, values, strict=True):
                col[i] = _coerce(name, v)
            cols[name] = col
        self._man = None  # re-read if a write below fails
        if "status" in cols:
            # Rows leaving ok (a changed checkpoint to redo) leave it first: a kill
            # after their new fingerprint is written must not leave them ok.
            demoted = [i for i in idx if was[i] == "ok" and cols["status"][i] != "ok"]
            if demoted:
                first = was.copy()
                first[demoted] = cols["status"][demoted]
                write_all([(g["status"], first)])
        # Every column but status together; status last (it is what readers trust).
        write_all([(g[name], col) for name, col in cols.items() if name != "status"])
        if "status" in cols:
            write_all([(g["status"], cols["status"])])
        man.update(cols)
        self._man = man

    # -- layers -----------------------------------------------------------------------

    def declare_layers(self, specs: dict[str, tuple[tuple[int, ...], np.dtype, bool, dict[str, Any]]]) -> None:
        """Create ``/layers/<name>`` with ``step``, ``weight``, ``bias`` and ``nonfinite``
        for the current step axis, for each ``name: (weight_shape, dtype, has_bias, attrs)``.

        Groups first, then every array of every layer in one concurrent batch.
        """
        steps = self.steps()
        n = len(steps)
        # Attributes go in with each node: ``attrs.update`` rewrites the node once per key.
        groups = [(f"{L.LAYERS}/{name}", attrs) for name, (_, _, _, attrs) in specs.items()]
        arrays: list[tuple[str, dict[str, Any]]] = []
        for name, (weight_shape, dtype, bias, _) in specs.items():
            base = f"{L.LAYERS}/{name}"
            shape = (n, *weight_shape)
            arrays.append((f"{base}/step", self._step_coord_spec(steps)))
            arrays.append((f"{base}/weight", dict(
                shape=shape, dtype=dtype, chunks=L.matrix_chunks(shape, dtype.itemsize),
                dimension_names=["step", "out", "in"], fill_value=np.nan, compressors=None,
                chunk_key_encoding=L.STEP_CHUNK_KEYS,
                attributes={"long_name": f"weight of {name}, (out, in) order", "units": "1"},
            )))
            if bias:
                arrays.append((f"{base}/bias", dict(
                    shape=(n, weight_shape[0]), dtype=dtype, chunks=(1, weight_shape[0]),
                    dimension_names=["step", "out"], fill_value=np.nan, compressors=None,
                    chunk_key_encoding=L.STEP_CHUNK_KEYS, attributes={"long_name": f"bias of {name}", "units": "1"},
                )))
            arrays.append((f"{base}/nonfinite", dict(
                shape=(n,), dtype="int64", chunks=(L.MANIFEST_CHUNK,), dimension_names=["step"],
                fill_value=-1,  # written by the driver with the manifest rows, like them chunked
                attributes={"long_name": f"NaN/Inf values in weight and bias of {name}"},
            )))
        create_nodes(self._zstore, groups=groups, arrays=arrays, overwrite_groups=True)


def _coerce(name: str, v: Any) -> Any:
    dtype = L.MANIFEST[name][0]
    if dtype is str:
        return "" if v is None else str(v)
    if v is None:
        return L.MANIFEST[name][1]
    return np.dtype(dtype).type(v)


# -- probe set and activations (capture) --------------------------------------------


def write_probe(store: GramlinStore, probe: Any, attrs: dict[str, Any]) -> None:
    """Create ``/probe`` (dims ``sample``, …) from a ``ProbeSet`` and its capture attrs.

    Attributes go in with each node (an ``attrs.update`` afterwards rewrites
    it); the group and its arrays, with their data, are created together.
    """
    n = probe.n_samples
    base = L.PROBE
    arrays: list[tuple[str, dict[str, Any]]] = [
        (f"{base}/sample", dict(data=np.arange(n, dtype=np.int64), chunks=(n,), dimension_names=["sample"],
                                attributes={"long_name": "probe sample index"})),
    ]
    x = np.ascontiguousarray(probe.inputs)
    arrays.append((f"{base}/inputs", dict(
        data=x, chunks=L.leading_chunks(x.shape, x.dtype.itemsize),
        dimension_names=["sample", *[f"input_dim_{i}" for i in range(1, x.ndim)]],
        attributes={"long_name": "probe inputs"},
    )))
    if probe.labels is not None:
        y = np.asarray(probe.labels, dtype=np.int64)
        arrays.append((f"{base}/labels", dict(
            data=y, chunks=y.shape or (1,),
            dimension_names=["sample", *[f"label_dim_{i}" for i in range(1, y.ndim)]],
            attributes={"long_name": "class index"},
        )))
    if probe.targets is not None:
        t = np.asarray(probe.targets)
        t2 = t.reshape(n, -1)
        arrays.append((f"{base}/targets", dict(
            data=t2, chunks=t2.shape, dimension_names=["sample", "target"],
            attributes={"long_name": "regression target", "original_shape": list(t.shape)},
        )))
    sid = None if probe.sample_id is None else np.asarray(probe.sample_id)
    text = sid is not None and sid.dtype.kind in "US"
    if sid is not None:
        # Text ids are stored as zarr's variable-length strings (no fixed-width dtype): created, then written.
        spec = dict(chunks=(n,), dimension_names=["sample"], attributes={"long_name": "sample id from the probe file"})
        arrays.append((f"{base}/sample_id", {**spec, "shape": (n,), "dtype": str} if text else {**spec, "data": sid}))
    create_nodes(store._zstore, groups=[(base, attrs)], arrays=arrays, overwrite_groups=True)
    if text:
        store.root[f"{base}/sample_id"][:] = sid.astype(object)


def declare_activations(
    store: GramlinStore,
    layers: dict[str, tuple[int, int, int, int]],
    *,
    dtype: np.dtype,
    agop: bool,
) -> None:
    """Create ``input``/``input_grad`` (step, sample, in) (and ``agop``) in each ``/layers/<layer>``.

    ``layers`` maps a layer to ``(n_samples, d_in, rows_per_chunk,
    samples_per_example)``; every array is created in one concurrent batch.
    """
    n_steps = len(store.steps())
    specs: list[tuple[str, dict[str, Any]]] = []
    for layer, (n_samples, d_in, rows_per_chunk, per_example) in layers.items():
        base = f"{L.LAYERS}/{layer}"
        shape = (n_steps, n_samples, d_in)
        chunks = (1, max(1, min(n_samples, rows_per_chunk)), d_in)
        for name, long_name in (
            ("input", f"input h of {layer} (previous layer's output; conv: unfolded patches)"),
            ("input_grad", f"g = W^T dL/dz of {layer}: loss gradient w.r.t. h through this layer only"),
        ):
            specs.append((f"{base}/{name}", dict(
                shape=shape, dtype=dtype, chunks=chunks, dimension_names=["step", "sample", "in"],
                fill_value=np.nan, compressors=None, overwrite=True, chunk_key_encoding=L.STEP_CHUNK_KEYS,
                attributes={"long_name": long_name, "samples_per_example": per_example},
            )))
        if agop:
            specs.append((f"{base}/agop", dict(
                shape=(n_steps, d_in, d_in), dtype="float64",
                chunks=L.matrix_chunks((n_steps, d_in, d_in), 8), dimension_names=["step", "in_i", "in_j"],
                fill_value=np.nan, compressors=None, overwrite=True, chunk_key_encoding=L.STEP_CHUNK_KEYS,
                attributes={"long_name": f"AGOP of the network output w.r.t. the input of {layer}"},
            )))
    create_nodes(store._zstore, arrays=specs)
    groups = [(store.root[f"{L.LAYERS}/{layer}"], per) for layer, (_, _, _, per) in layers.items()]
    _gather([g._async_group.update_attributes({"samples_per_example": per}) for g, per in groups])


class _AlignedPool:
    """Page-aligned buffers for whole chunks, reused across the chunks and tasks of a process.

    A chunk is assembled from capture batches in one of these and written
    from it with no further copy (``O_DIRECT`` wants page-aligned memory).
    Fresh memory for every chunk cost page faults on all of it (and, on the
    development VM, the hypervisor backing it anew): reusing buffers makes a
    chunk one copy of warm memory. At most ``max_idle_bytes`` are kept.
    """

    def __init__(self, max_idle_bytes: int = 128 << 20):
        self.max_idle_bytes = max_idle_bytes
        self._free: dict[int, list] = {}
        self._idle = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int):
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._idle -= size
                return free.pop()
        import mmap

        return mmap.mmap(-1, size)

    def give(self, buf) -> None:
        with self._lock:
            if self._idle + len(buf) <= self.max_idle_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._idle += len(buf)

    def clear(self) -> list:
        """Forget the idle buffers; they are returned, for the caller to drop."""
        with self._lock:
            idle = [b for bufs in self._free.values() for b in bufs]
            self._free = {}
            self._idle = 0
        return idle


_chunk_buffers = _AlignedPool()


def release_buffers() -> None:
    """Drop the idle chunk buffers of this process (the end of an ingest).

    They are unmapped on a thread of their own: unmapping the 128 MB a
    capture keeps took about 20 ms, which the ingest's caller need not wait for.
    """
    idle = _chunk_buffers.clear()
    if idle:
        threading.Thread(target=idle.clear, name="gramlin-release", daemon=True).start()


class _Chunk:
    """One chunk of ``input`` and ``input_grad`` being assembled: rows ``first:first+rows``."""

    __slots__ = ("first", "rows", "filled", "bufs", "H", "G")

    def __init__(self, first: int, rows: int, d: int, dtype: np.dtype):
        self.first, self.rows, self.filled = first, rows, 0
        nbytes = rows * d * dtype.itemsize
        self.bufs = (_chunk_buffers.take(nbytes), _chunk_buffers.take(nbytes))
        self.H, self.G = (np.frombuffer(b, dtype=dtype, count=rows * d).reshape(rows, d) for b in self.bufs)

    def release(self) -> None:
        self.H = self.G = None
        for b in self.bufs:
            _chunk_buffers.give(b)


class ActivationSink:
    """Writes capture batches into one step's rows of ``input``/``input_grad``.

    Batches arrive in order and are copied into the chunk they belong to
    (page-aligned buffers reused across chunks, see :class:`_AlignedPool`),
    so that every chunk is written whole, once. Whole chunks are written by
    a background thread while the model computes the next batch (at most
    ``max_pending`` chunks in flight, so memory stays bounded); :meth:`flush`
    writes the rest and waits for every write, re-raising any error.
    """

    def __init__(self, layers_group: zarr.Group, index: int, layers: list[str], *, max_pending: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.index = index
        self.arrays = {
            n: (writable(layers_group[n]["input"]), writable(layers_group[n]["input_grad"])) for n in layers
        }
        self.rows = {n: a[0].chunks[1] for n, a in self.arrays.items()}
        self.open: dict[str, _Chunk | None] = {n: None for n in layers}
        self.written = {n: 0 for n in layers}
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gramlin-sink")
        self._pending: list = []
        self._finished = False

    def _write(self, layer: str, chunk: _Chunk) -> None:
        ah, ag = self.arrays[layer]
        index = self.index

        def job() -> None:
            try:
                put_rows(ah, index, chunk.first, chunk.H[: chunk.filled])
                put_rows(ag, index, chunk.first, chunk.G[: chunk.filled])
            finally:
                chunk.release()

        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(job))
        self.written[layer] += chunk.filled

    def __call__(self, layer: str, start: int, h: np.ndarray, g: np.ndarray) -> None:
        if layer not in self.arrays:
            return
        ah = self.arrays[layer][0]
        total, rows = ah.shape[1], self.rows[layer]
        off, n = 0, len(h)
        while off < n:
            chunk = self.open[layer]
            if chunk is None:
                pos = start + off
                # the rows up to the chunk boundary (or the last sample); past the
                # end, what is left (put_rows then refuses it with IndexError)
                size = min(rows - pos % rows, total - pos) if pos < total else n - off
                chunk = self.open[layer] = _Chunk(pos, size, ah.shape[2], ah.dtype)
            k = min(n - off, chunk.rows - chunk.filled)
            chunk.H[chunk.filled : chunk.filled + k] = h[off : off + k]
            chunk.G[chunk.filled : chunk.filled + k] = g[off : off + k]
            chunk.filled += k
            off += k
            if chunk.filled == chunk.rows:
                self.open[layer] = None
                self._write(layer, chunk)

    def flush(self) -> None:
        """Write what is left and wait for every write (re-raising the first error)."""
        self.finish(wait=True)

    def finish(self, *, wait: bool) -> Future:
        """Write what is left; a future that is done when every write of this step is.

        With ``wait=False`` the writes go on in the background (write-behind:
        the task can return while the device catches up); the future raises
        the first write error.
        """
        self._finished = True
        try:
            for layer, chunk in self.open.items():
                if chunk is not None and chunk.filled:
                    self._write(layer, chunk)
                elif chunk is not None:
                    chunk.release()
                self.open[layer] = None
            pending, self._pending = self._pending, []
            if wait:
                for fut in pending:
                    fut.result()
                done: Future = Future()
                done.set_result(None)
                return done

            def barrier() -> None:  # the writer runs jobs in order: this one runs last
                for fut in pending:
                    fut.result()

            return self._pool.submit(barrier)
        finally:
            self._pool.shutdown(wait=wait)

    def close(self) -> None:
        """Stop the writer thread (pending writes finish first, unless :meth:`finish`
        already handed them to the background) and drop chunks never written."""
        if not self._finished:
            self._pool.shutdown(wait=True)
        for layer, chunk in self.open.items():
            if chunk is not None:
                chunk.release()
                self.open[layer] = None

    def check_complete(self) -> None:
        for layer, (ah, _) in self.arrays.items():
            if self.written[layer] != ah.shape[1]:
                raise StoreError(
                    f"layer {layer}: capture wrote {self.written[layer]} of {ah.shape[1]} samples"
                )
