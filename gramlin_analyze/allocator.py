"""Large temporaries reuse freed heap memory on Dask workers, instead of new pages each time.

glibc hands freed memory at the top of a heap back to the system once it
exceeds the *trim threshold*, and maps every block above the *mmap
threshold* anew; either way the next allocation gets fresh pages, which the
kernel zeroes as they are touched. By itself glibc raises both thresholds
as it sees large blocks freed, but a Dask nanny starts its worker with
``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``),
which fixes the trim threshold at 64 KiB and turns that adjustment off
(mallopt(3)). An ``analyze`` worker then spent 40% of its CPU time zeroing
pages in the kernel, and ran half as fast (docs/performance.md, e).

:func:`keep_freed_memory` sets both thresholds for the worker's process
through glibc's public ``mallopt`` when a run's tasks reach it;
:func:`release_freed_memory` (``malloc_trim``) hands what is free back when
the run ends, so a worker's memory between runs is what the nanny's setting
would leave. The thresholds stay for the worker's life (glibc cannot report
the ones they replace). (Trimming after every task instead cost 8% of analyze's time.)
Threads of the driver's own process are left as they are (glibc adjusts
there, and a notebook's process is the user's). Elsewhere (musl, macOS,
Windows) both are no-ops. ``GRAMLIN_MALLOPT=0`` in a worker's environment
keeps its allocator as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from functools import cache

__all__ = ["keep_freed_memory", "release_freed_memory"]

#: glibc's ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's own dynamic ceiling is 32 MiB;
#: a float64 block of 4,096 samples x 2,048 features is 64 MiB).
MMAP_THRESHOLD = 64 << 20
#: Free memory kept at a heap's top during a task before glibc returns it.
TRIM_THRESHOLD = 256 << 20

_lock = threading.Lock()
_set = False


@cache
def _glibc() -> ctypes.CDLL | None:
    """This process's glibc, or None (another libc, or none that ctypes can find)."""
    if os.environ.get("GRAMLIN_MALLOPT", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only: the capability probe
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Once per process: serve blocks below 64 MiB from the heap and keep up to 256 MiB free
    there while tasks run. True when set (now or before)."""
    global _set
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if not _set:
            _set = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
    return _set


def release_freed_memory() -> None:
    """Return the heap's free memory to the system (at a run's end), where it was kept."""
    if _set and (libc := _glibc()) is not None:
        libc.malloc_trim(0)
