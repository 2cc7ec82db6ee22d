"""Running one task per item on the scheduler the user chose.

Threads (dask's local threaded scheduler) by default; a ``LocalCluster`` of
processes with ``workers``; an existing scheduler with ``scheduler``. The
callback runs in the driver as each task finishes, so the driver can record
progress (and, for ingest, mark steps ok) one task at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["make_runner"]


def make_runner(workers: int | None, scheduler: str | None, threads: int | None):
    """Return ``run(funcs, on_done)`` executing callables on the chosen scheduler."""

    def run_threads(tasks: list, on_done: Callable[[dict], None]) -> None:
        import dask
        from dask.callbacks import Callback

        keys = {}
        delayed = []
        for t in tasks:
            d = dask.delayed(t[0], pure=False)(*t[1:])
            keys[d.key] = d
            delayed.append(d)

        class _Done(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if key in keys:
                    on_done(result)

        with _Done():
            dask.compute(*delayed, scheduler="threads", num_workers=threads or os.cpu_count())

    def run_distributed(tasks: list, on_done: Callable[[dict], None]) -> None:
        from distributed import Client, LocalCluster, as_completed

        if scheduler:
            client = Client(scheduler)
            cluster = None
        else:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=40,
            )
            client = Client(cluster)
        try:
            futures = [client.submit(t[0], *t[1:], pure=False) for t in tasks]
            for fut in as_completed(futures):
                on_done(fut.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    if scheduler or (workers and workers > 0):
        return run_distributed
    return run_threads


