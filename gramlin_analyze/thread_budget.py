"""How many BLAS and torch threads each task gets, on threads of this process or on workers.

Tasks run in parallel, so each one's kernels get a share of the cores (see
:mod:`gramlin_analyze.scheduling` for the rule). Two settings are per thread
(OpenMP's thread count, which torch uses) and one is per process (BLAS's
own pool, which threadpoolctl lets only the first thread that set it change):
the task thread sets the first, the driver or the worker's own thread the
second.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gramlin_analyze.allocator import keep_freed_memory
from gramlin_analyze.dask_target import worker_cores

__all__ = [
    "TaskBudget",
    "budget_here",
    "kernel_threads",
    "set_process_budget",
    "set_thread_budget",
    "task_threads",
    "threads_override",
]

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
    """Limit BLAS (threadpoolctl) and, when imported, torch to ``n`` threads.

    ``n`` of at least the cores is no limit: nothing is changed (and
    threadpoolctl, which inspects every loaded library, is not consulted).
    """
    if n >= (os.cpu_count() or 1):
        yield
        return
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


_override: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "gramlin_threads_per_task", default=None
)


def threads_override() -> int | None:
    """The threads per task of the innermost :func:`task_threads` block, or None."""
    return _override.get()


@contextmanager
def task_threads(n: int | None) -> Iterator[None]:
    """Runners made in the body give each task ``n`` BLAS/torch threads (None: the usual rule).

    For callers that cannot pass ``threads_per_task=`` down to
    :func:`gramlin_analyze.scheduling.make_runner`.
    """
    if n is not None and n < 1:
        from gramlin_analyze.errors import UsageError

        raise UsageError(f"threads per task must be at least 1, got {n}")
    token = _override.set(n)
    try:
        yield
    finally:
        _override.reset(token)


@dataclass(frozen=True, slots=True)
class TaskBudget:
    """Kernel threads for the tasks of one cluster run, sent with every task.

    ``per_worker`` maps a worker's address to its tasks' threads; a worker that
    joined later works its own share out (its cores over its task slots).
    ``preload`` names modules to import first, so that their threads are set
    too (torch, imported by a capture task only after the limits were applied).
    """

    per_worker: dict[str, int]
    fixed: int | None = None
    preload: tuple[str, ...] = ()
    driver_pid: int = 0


_applied = threading.local()  # per task thread: OpenMP's thread count is a per-thread setting


def _import(names: tuple[str, ...]) -> None:
    import importlib

    for name in names:
        importlib.import_module(name)


def set_thread_budget(n: int, preload: tuple[str, ...]) -> None:
    """This task thread's OpenMP and torch threads: ``n``, kept for its next tasks.

    Set in the thread that runs the task: OpenMP's thread count is per thread,
    and a pool thread kept from an earlier run keeps that run's. Nothing is
    restored after a task: tasks run at once, and one restoring the limit
    would change it under the others. BLAS's process-wide pool is not set here
    (threadpoolctl leaves it to the first thread that set it): the driver's
    :func:`kernel_threads` or :func:`set_process_budget` set it.
    """
    _import(preload)
    key = (n, len(sys.modules))
    if getattr(_applied, "key", None) == key:
        return
    _threadpools().limit(limits=n, user_api="openmp")  # not a context: it stays
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    _applied.key = key


def set_process_budget(budget: TaskBudget, dask_worker=None) -> None:
    """On a worker, in its own thread (``client.run``): its BLAS pool's threads for the run,
    and its allocator's thresholds (:func:`~gramlin_analyze.allocator.keep_freed_memory`).

    A Dask nanny starts workers with ``OMP_NUM_THREADS=1``, so the limit is
    raised as well as lowered. (A worker that joins later keeps its own.)
    """
    if os.getpid() == budget.driver_pid:  # workers of threads in the driver: per task instead
        return
    keep_freed_memory()
    _import(budget.preload)
    n = budget.fixed or budget.per_worker.get(dask_worker.address)
    if n is not None:
        _threadpools().limit(limits=n, user_api="blas")


def budget_here(budget: TaskBudget) -> int:
    """This worker's threads per task under ``budget``."""
    if budget.fixed is not None:
        return budget.fixed
    from distributed import get_worker

    worker = get_worker()
    n = budget.per_worker.get(worker.address)
    return n if n is not None else max(1, len(worker_cores()) // worker.state.nthreads)
