"""Running one task per item on the scheduler the user chose.

Threads (dask's local threaded scheduler) by default; a ``LocalCluster`` of
processes with ``workers``; an existing scheduler with ``scheduler``. The
callback runs in the driver as each task finishes, so the driver can record
progress (and, for ingest, mark steps ok) one task at a time.

Tasks run in parallel, so each one's BLAS and torch get ``cores / tasks``
threads (at least one): two tasks each spinning two OpenMP threads on two
cores were 1.3x slower than one thread each, and starved zarr's I/O thread.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["make_runner", "kernel_threads"]


_controller: tuple[int, Any] | None = None


def _threadpools():
    """threadpoolctl's controller, kept while no module was imported since.

    Building one inspects every loaded shared library (about 3 ms); a new
    import may have loaded another BLAS, so any new module means a new one.
    """
    global _controller
    from threadpoolctl import ThreadpoolController

    n_modules = len(sys.modules)
    if _controller is None or _controller[0] != n_modules:
        _controller = (n_modules, ThreadpoolController())
    return _controller[1]


@contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """Limit BLAS (threadpoolctl) and, when imported, torch to ``n`` threads."""
    torch = sys.modules.get("torch")
    old = torch.get_num_threads() if torch is not None else None
    with _threadpools().limit(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None and old:
                torch.set_num_threads(old)


def _limited(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a worker process with ``n`` kernel threads."""
    with kernel_threads(n):
        return fn(*args)


def make_runner(workers: int | None, scheduler: str | None, threads: int | None):
    """Return ``run(tasks, on_done)``; a task is ``(fn, *args)``, started in list order."""
    cores = os.cpu_count() or 1

    def run_threads(tasks: list, on_done: Callable[[dict], None]) -> None:
        import dask
        from dask.callbacks import Callback

        keys = {}
        delayed = []
        # Tasks start in the order given (the threaded scheduler breaks ties
        # between independent tasks by key, last key first), so a caller can
        # finish one group of tasks early and act on it while the rest run.
        run = uuid.uuid4().hex[:12]
        for k, t in enumerate(tasks):
            d = dask.delayed(t[0], pure=False)(*t[1:], dask_key_name=f"gramlin-{run}-{len(tasks) - 1 - k:08d}")
            keys[d.key] = d
            delayed.append(d)

        class _Done(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if key in keys:
                    on_done(result)

        # Twice as many tasks as cores by default: each task alternates between
        # single-threaded kernels and zarr I/O waits, and overlapping them made
        # analyze --metrics gram 1.3x faster than one task per core here.
        n = max(1, min(threads or 2 * cores, len(tasks)))
        with _Done(), kernel_threads(max(1, cores // n)):
            dask.compute(*delayed, scheduler="threads", num_workers=n)

    def run_distributed(tasks: list, on_done: Callable[[dict], None]) -> None:
        from distributed import Client, LocalCluster, as_completed

        if scheduler:
            client = Client(scheduler)
            cluster = None
            per = 1
        else:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=40,
            )
            client = Client(cluster)
            per = max(1, cores // workers)
        try:
            futures = [client.submit(_limited, per, *t, pure=False) for t in tasks]
            for fut in as_completed(futures):
                on_done(fut.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    if scheduler or (workers and workers > 0):
        return run_distributed
    return run_threads
