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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gramlin_analyze.dask_target import (
    CONNECT_TIMEOUT_S,
    SchedulerUnreachableError,
    Target,
    WorkerCheck,
    WorkerSetupError,
    dask_target,
    task_path,
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


# -- kernel threads -----------------------------------------------------------------------

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


def _limited(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a worker process with ``n`` kernel threads."""
    with kernel_threads(n):
        return fn(*args)


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


def run_on_cluster(client, tasks: list, on_done: Callable[[Any], None], per: int) -> None:
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
            futures.append(client.submit(_limited, per, *task, pure=False))
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
                if fut.status != "finished":  # cancelled or lost: the step stays pending
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


def make_runner(workers: int | None, scheduler: Any, threads: int | None):
    """Return ``run(tasks, on_done)``; a task is ``(fn, *args)``, started in list order.

    ``scheduler``: a ``distributed.Client`` (used as is), a cluster or a
    scheduler's address (connected for the run, then closed), or None.
    """
    cores = os.cpu_count() or 1
    if isinstance(scheduler, str) and not scheduler:  # an empty address: none, as before
        scheduler = None

    def run_threads(tasks: list, on_done: Callable[[dict], None]) -> None:
        # Twice as many tasks as cores by default: each task alternates between
        # single-threaded kernels and zarr I/O waits, and overlapping them made
        # analyze --metrics gram 1.3x faster than one task per core here.
        n = max(1, min(threads or 2 * cores, len(tasks)))
        with kernel_threads(max(1, cores // n)):
            run_on_threads(tasks, on_done, n)

    def run_distributed(tasks: list, on_done: Callable[[dict], None]) -> None:
        from distributed import Client, LocalCluster

        if _stop.is_set():  # asked to stop while planning: no cluster to start
            return
        if scheduler is not None:
            with dask_target(scheduler) as target:
                run_on_cluster(target.client, tasks, on_done, 1)
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
            run_on_cluster(client, tasks, on_done, max(1, cores // workers))
        finally:
            client.close()
            cluster.close()

    if scheduler is not None or (workers and workers > 0):
        return run_distributed
    return run_threads
