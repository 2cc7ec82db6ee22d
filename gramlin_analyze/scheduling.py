"""Running one task per item, on threads or on a Dask cluster, and stopping on request.

Threads of this process by default (a pool kept across runs, so the tasks'
per-thread work arrays are reused); a ``LocalCluster`` of processes with
``workers``; any Dask client, cluster or scheduler address with ``client``
(:func:`dask_target`: connected, or refused, before the store is touched; the
active ``distributed`` client when none is named). The callback runs
in the driver as each task finishes, so the driver can record progress (and,
for ingest, mark steps ok) one task at a time.

Tasks run in parallel, so each one's BLAS and torch get ``cores / tasks``
threads (at least one): two tasks each spinning two OpenMP threads on two
cores were 1.3x slower than one thread each, and starved zarr's I/O thread.
On a cluster the same rule holds per machine (:func:`worker_budgets`): a
worker's tasks share the cores its process may run on with every task slot
of the workers on that machine bound to the same cores, so one worker with
one slot on a 32-core node gives its task 32 threads. ``threads_per_task``
(or :func:`task_threads` around a run) sets the number instead.

Stopping: :func:`stop_on_signals` (the command line, while a command runs)
turns SIGINT and SIGTERM into a request to stop. The runner then starts no
new task, waits for the running ones and hands their results to the callback
(a step that finished is recorded), and returns; the driver closes the run
as usual, with the rest of the work left for the next run. A second signal
stops the process at once (a store survives a killed writer).
"""

from __future__ import annotations

import contextvars
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gramlin_analyze.allocator import keep_freed_memory, release_freed_memory
from gramlin_analyze.dask_target import (
    CONNECT_TIMEOUT_S,
    SchedulerUnreachableError,
    Target,
    WorkerCheck,
    WorkerSetupError,
    dask_target,
    task_path,
    worker_budgets,
)
from gramlin_analyze.thread_budget import (
    TaskBudget,
    budget_here,
    kernel_threads,
    set_process_budget,
    set_thread_budget,
    task_threads,
    threads_override,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "SchedulerUnreachableError",
    "Target",
    "WorkerCheck",
    "WorkerSetupError",
    "dask_target",
    "make_runner",
    "task_path",
    "kernel_threads",
    "TaskBudget",
    "task_threads",
    "worker_budgets",
    "stop_on_signals",
    "stop_requested",
    "StopState",
]


# -- stopping on request ---------------------------------------------------------------

_stop = threading.Event()  # set by stop_on_signals' handler, cleared when its block ends


def stop_requested() -> bool:
    """Whether a stop was asked for: long loops between tasks return early then."""
    return _stop.is_set()


@dataclass
class StopState:
    """What :func:`stop_on_signals` saw: ``signum`` is the signal that asked to stop, or None."""

    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by that signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + int(self.signum or signal.SIGINT)


@contextmanager
def stop_on_signals(
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[StopState]:
    """While the body runs, the first of ``signals`` asks the task runner to stop.

    The handlers are installed only here (in the main thread) and the previous
    ones restored on exit. They replace an inherited "ignore" too: a command
    started with ``&`` by a script ignores SIGINT from birth, but ``kill -INT``
    of it is a request to stop. A second signal ends the process at once with
    the signal's default action. Elsewhere (a thread, a notebook calling the
    library) nothing is installed.
    """
    state = StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame) -> None:
        if _stop.is_set():  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        state.signum = signum
        _stop.set()

    _stop.clear()
    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, handler)
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _stop.clear()


def _limited(budget: TaskBudget, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a worker with its share of kernel threads (see :class:`TaskBudget`)."""
    if os.getpid() == budget.driver_pid:  # a cluster of threads in the driver: leave it as it was
        with kernel_threads(budget_here(budget)):
            return fn(*args)
    set_thread_budget(budget_here(budget), budget.preload)
    keep_freed_memory()  # a worker that joined after the run's start did not get it yet
    return fn(*args)


def _with_threads(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on a task thread of this process with ``n`` kernel threads."""
    set_thread_budget(n, ())
    return fn(*args)


class _Each:
    """``tasks`` with ``head`` before each one's ``(fn, *args)``, taken one at a time: a
    feed that runs dry and is fed again (by a finished task's callback) goes on."""

    def __init__(self, tasks: Iterable[tuple], head: tuple) -> None:
        self.tasks, self.head = iter(tasks), head

    def __iter__(self) -> _Each:
        return self

    def __next__(self) -> tuple:
        return (*self.head, *next(self.tasks))


# -- runners ----------------------------------------------------------------------------

_POLL_S = 0.25  # the driver wakes this often while tasks run, so a signal is seen promptly
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _thread_pool(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` task threads, kept across runs (their work arrays are per thread)."""
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="gramlin-task")
        return pool


def run_on_threads(tasks: list, on_done: Callable[[Any], None], n: int) -> None:
    """Run ``tasks`` on ``n`` threads, started in list order, at most ``n`` at a time.

    ``on_done`` runs in the calling thread as each task returns. After a task
    raised, or once a stop is requested, no task is started; the running
    ones finish and are recorded; then the first error is raised (a stop
    just returns). A KeyboardInterrupt in the calling thread (no handler
    installed) waits for the running tasks, so that none writes after the
    caller's closing bookkeeping, and propagates.
    """
    pool = _thread_pool(n)
    todo = iter(enumerate(tasks))
    running: dict[Future, int] = {}
    error: BaseException | None = None
    try:
        while True:
            while len(running) < n and error is None and not _stop.is_set():
                item = next(todo, None)
                if item is None:
                    break
                k, (fn, *args) = item
                running[pool.submit(contextvars.copy_context().run, fn, *args)] = k
            if not running:
                break
            done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=running.__getitem__):
                del running[fut]
                exc = fut.exception()
                if exc is not None:
                    error = error or exc
                else:
                    on_done(fut.result())
    except BaseException:
        wait(running)  # a second interrupt here abandons them
        raise
    if error is not None:
        raise error


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Worker processes started in the body ignore SIGINT from birth.

    A Ctrl-C at the terminal reaches the whole process group; it is the
    driver's to act on (it stops scheduling and collects what runs), and a
    worker that dies of it loses its task. An ignored signal stays ignored
    across fork and exec (a handler would not), and Python then installs no
    KeyboardInterrupt in the worker. A SIGINT to the driver while the workers
    start (a second or two) is lost: press Ctrl-C again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)


#: Once a stop is asked for, how long tasks already on a cluster may take to finish
#: (after that they are cancelled and their steps left for the next run).
STOP_GRACE_S = 30.0


def run_on_cluster(client, tasks: list, on_done: Callable[[Any], None], budget: TaskBudget) -> None:
    """Run ``tasks`` on a Dask cluster, a window at a time, started in list order.

    A window of tasks in flight rather than all at once: after an error or a
    stop no task is submitted, the ones in flight finish (a stop waits at
    most :data:`STOP_GRACE_S`, then cancels them) and are recorded; then the
    first error is raised.
    """
    from distributed import as_completed

    futures: list = []
    pending = as_completed(loop=client.loop)  # a client not the default one has its own loop
    todo = iter(tasks)
    error: BaseException | None = None
    deadline: float | None = None

    def submit_next() -> None:
        task = None if _stop.is_set() else next(todo, None)
        if task is not None:
            futures.append(client.submit(_limited, budget, *task, pure=False))
            pending.add(futures[-1])

    try:
        cores = os.cpu_count() or 1
        for _ in range(max(8, 2 * cores, 2 * sum(client.nthreads().values()))):
            submit_next()
        while pending.count():
            if _stop.is_set() and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                client.cancel(futures)
                break
            batch = pending.next_batch(block=False)
            if not batch:
                time.sleep(0.05)
                continue
            for fut in batch:
                if fut.status == "error":
                    error = error or fut.exception()
                    continue
                if fut.status == "lost" and deadline is None:
                    # its worker died after it finished: the scheduler recomputes it,
                    # so wait for it again (skipped, the step stayed pending, exit 0)
                    pending.add(fut)
                    continue
                if fut.status != "finished":  # cancelled: the step stays pending
                    continue
                try:
                    res = fut.result(
                        timeout=None if deadline is None else max(0.1, deadline - time.monotonic())
                    )
                except TimeoutError:  # stopping, and its result is not coming back (a lost worker)
                    continue
                on_done(res)
                if error is None:
                    submit_next()
    except BaseException:
        client.cancel(futures)
        raise
    if error is not None:
        raise error


def make_runner(
    workers: int | None,
    scheduler: Any,
    threads: int | None,
    *,
    threads_per_task: int | None = None,
    preload: tuple[str, ...] = (),
):
    """Return ``run(tasks, on_done)``; a task is ``(fn, *args)``, started in list order.

    ``scheduler``: a ``distributed.Client`` (used as is), a cluster or a
    scheduler's address (connected for the run, then closed), or None.
    ``threads_per_task``: BLAS/torch threads of each task (default: the
    :func:`task_threads` in effect, else cores over the tasks running at once,
    per machine on a cluster). ``preload``: modules a worker imports before
    its threads are set (those the tasks will import, such as torch).
    """
    cores = os.cpu_count() or 1
    if isinstance(scheduler, str) and not scheduler:  # an empty address: none, as before
        scheduler = None
    fixed = threads_per_task if threads_per_task is not None else threads_override()

    def run_threads(tasks: list, on_done: Callable[[dict], None]) -> None:
        # Twice as many tasks as cores by default: each task alternates between
        # single-threaded kernels and zarr I/O waits, and overlapping them made
        # analyze --metrics gram 1.3x faster than one task per core here.
        n = max(1, min(threads or 2 * cores, len(tasks)))
        per = fixed or max(1, cores // n)
        with kernel_threads(per):  # BLAS's pool is the process's: the driver's threads too
            run_on_threads(_Each(tasks, (_with_threads, per)), on_done, n)

    def run_there(client, tasks: list, on_done: Callable[[dict], None]) -> None:
        per_worker = {} if fixed is not None else worker_budgets(client)
        budget = TaskBudget(per_worker, fixed, tuple(preload), os.getpid())
        client.run(set_process_budget, budget)
        run_on_cluster(client, tasks, on_done, budget)
        # what the workers kept for the run goes back; a worker gone by now has nothing to give
        client.run(release_freed_memory, on_error="ignore")

    def run_distributed(tasks: list, on_done: Callable[[dict], None]) -> None:
        from distributed import Client, LocalCluster

        if _stop.is_set():  # asked to stop while planning: no cluster to start
            return
        if scheduler is not None:
            with dask_target(scheduler) as target:
                run_there(target.client, tasks, on_done)
            return
        with children_ignore_sigint():
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
        client = Client(cluster)
        try:
            run_there(client, tasks, on_done)
        finally:
            client.close()
            cluster.close()

    if scheduler is not None or (workers and workers > 0):
        return run_distributed
    return run_threads
