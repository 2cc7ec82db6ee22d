"""Chunk files written and read straight, large ones with ``O_DIRECT``.

What zarr's local store does for one chunk (a temporary file, then a rename),
without its event loop; large chunks bypass the page cache. Also the
page-aligned buffers that direct I/O reads and writes without a copy.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np

__all__ = [
    "DIRECT_IO_MIN_BYTES",
    "aligned_empty",
    "chunk_buffers",
    "direct_io_enabled",
    "forget_refused_devices",
    "read_raw_chunk",
    "refused_devices",
    "release_buffers",
    "write_raw_chunk",
]


def write_raw_chunk(path: Path, data: np.ndarray) -> bool:
    """Write one chunk's bytes atomically, as zarr's local store does (temp file, rename).

    Chunks of at least :data:`DIRECT_IO_MIN_BYTES` bypass the page cache
    (``O_DIRECT``, see :func:`_write_direct`) where the file system allows
    it; ``GRAMLIN_DIRECT_IO=0`` turns that off.

    Returns
    -------
    bool
        True when the bytes bypassed the page cache, False when they went
        through it (the file holds the same bytes either way).
    """
    view = memoryview(np.ascontiguousarray(data)).cast("B")  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ on 3.12+ only
    try:
        return _write_replacing(path, view)
    except FileNotFoundError:
        # A new directory, made only now: a mkdir before every write (a failing
        # system call and an exception when it exists) was a fifth of the file
        # system's time in setting up a store.
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_replacing(path, view)


def _write_replacing(path: Path, view: memoryview) -> bool:
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        direct = _write_direct(tmp, view)
        if not direct:
            with tmp.open("wb") as f:
                f.write(view)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return direct


DIRECT_IO_MIN_BYTES = 1 << 20
_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the logical block size
_STAGING_BYTES = 8 << 20  # per thread: the aligned buffer unaligned data is copied through
_direct_unsupported: set[int] = set()  # st_dev of file systems that refused O_DIRECT
_staging = threading.local()


def direct_io_enabled() -> bool:
    """Whether large chunk writes may bypass the page cache (``GRAMLIN_DIRECT_IO``, default on)."""
    return hasattr(os, "O_DIRECT") and os.environ.get(
        "GRAMLIN_DIRECT_IO", "1"
    ).strip().lower() not in (
        "0",
        "off",
        "false",
        "no",
    )


def refused_devices() -> frozenset[int]:
    """The devices (``st_dev``) whose file systems refused ``O_DIRECT`` in this process.

    Large chunks on them are written and read through the page cache from
    then on, without trying ``O_DIRECT`` again.
    """
    return frozenset(_direct_unsupported)


def forget_refused_devices() -> None:
    """Let the next large chunk try ``O_DIRECT`` again on every file system
    (after one was remounted with other options, or between tests)."""
    _direct_unsupported.clear()


def _staging_buffer() -> memoryview:
    buf = getattr(_staging, "buf", None)
    if buf is None:
        buf = _staging.buf = mmap.mmap(-1, _STAGING_BYTES)  # page-aligned, reused by this thread
    return memoryview(buf)


def _write_direct(tmp: Path, view: memoryview) -> bool:
    """Write ``view`` to the new file ``tmp`` with ``O_DIRECT``; False when not done
    (the caller then writes it through the page cache; ``tmp`` may exist).

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
            return False  # alignment this device does not accept: the caller writes it
        os.ftruncate(fd, n)
    finally:
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
    view = memoryview(out).cast("B")  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ on 3.12+ only
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
        _direct_unsupported.add(cast(int, dev))  # direct: dev was read
        return read_raw_chunk(path, out)
    try:
        if os.fstat(fd).st_size != n:
            return False
        if direct:
            if not _direct_accepted(cast(int, dev), lambda: _pread_aligned(fd, view)):
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
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(_ALIGN, count * dtype.itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


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


chunk_buffers = _AlignedPool()


def release_buffers() -> None:
    """Drop the idle chunk buffers of this process (the end of an ingest).

    They are unmapped on a thread of their own: unmapping the 128 MB a
    capture keeps took about 20 ms, which the ingest's caller need not wait for.
    """
    idle = chunk_buffers.clear()
    if idle:
        threading.Thread(target=idle.clear, name="gramlin-release", daemon=True).start()
