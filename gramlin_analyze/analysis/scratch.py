"""Work arrays kept per thread between the tasks (and runs) of ``analyze``.

Each task of a layer needs the same few multi-MB arrays; a thread keeps them
for its next task instead of allocating fresh memory every time.
"""

from __future__ import annotations

import threading

import numpy as np

from gramlin_analyze.store import aligned_empty

__all__ = ["scratch_array", "hold_scratch", "release_scratch", "SCRATCH_IDLE_SECONDS"]

#: Most bytes of work arrays a task thread keeps between tasks (and runs);
#: bigger arrays are allocated per task.
_SCRATCH_MAX_BYTES = 64 * 2**20
#: Seconds after the last run before the kept work arrays are dropped.
SCRATCH_IDLE_SECONDS = 30.0
_scratch: dict[int, dict[tuple, np.ndarray]] = {}
_scratch_lock = threading.Lock()
_scratch_timer: threading.Timer | None = None
_scratch_users = 0


def scratch_array(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread, page-aligned work array, reused by the next tasks (same thread, same shape).

    Each task of a layer needs the same few multi-MB arrays (W in float64,
    its Gram, the Gram in the stored dtype). Fresh memory for each meant page
    faults on every first touch (on the development VM the hypervisor backs
    new memory at about 2.5 ms per MB, more than the Gram itself costs), so
    a thread keeps up to 64 MB of them, also across runs: an incremental
    ``analyze`` of one new step has too few tasks per thread to amortize new
    memory. They are dropped :data:`SCRATCH_IDLE_SECONDS` after the last run
    (:func:`release_scratch`). The arrays never leave the task.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    arrays = _scratch.setdefault(threading.get_ident(), {})
    key = (name, tuple(shape), dtype.str)
    a = arrays.get(key)
    if a is None:
        if nbytes > _SCRATCH_MAX_BYTES:
            return np.empty(shape, dtype)
        if nbytes + sum(x.nbytes for x in arrays.values()) > _SCRATCH_MAX_BYTES:
            arrays.clear()  # another layer's shapes: make room
        a = arrays[key] = aligned_empty(shape, dtype)  # page-aligned: direct I/O needs no copy
    return a


def hold_scratch() -> None:
    """A run starts: keep the work arrays (cancel a pending release)."""
    global _scratch_timer, _scratch_users
    with _scratch_lock:
        _scratch_users += 1
        if _scratch_timer is not None:
            _scratch_timer.cancel()
            _scratch_timer = None


def release_scratch(delay: float | None = None) -> None:
    """A run ended: drop the kept work arrays ``delay`` seconds from now
    (default :data:`SCRATCH_IDLE_SECONDS`; 0 drops them at once), unless
    another run starts before."""
    global _scratch_timer, _scratch_users
    with _scratch_lock:
        _scratch_users = max(0, _scratch_users - 1)
        if _scratch_timer is not None:
            _scratch_timer.cancel()
            _scratch_timer = None
        if _scratch_users:
            return
        delay = SCRATCH_IDLE_SECONDS if delay is None else delay
        if delay <= 0:
            _scratch.clear()
            return
        _scratch_timer = threading.Timer(delay, _drop_scratch)
        _scratch_timer.daemon = True
        _scratch_timer.start()


def _drop_scratch() -> None:
    with _scratch_lock:
        if not _scratch_users:
            _scratch.clear()
