"""Starting a cluster for one command: a batch system's jobs (dask-jobqueue) or local processes.

The command line's ``--cluster KIND --jobs N`` comes here: :func:`cluster_address`
starts the cluster, asks for ``N`` jobs, waits until their workers are up (a
progress line, a timeout), yields the scheduler's address for the task runner,
and shuts the cluster down afterwards (its jobs cancelled) whatever happened:
success, an error, Ctrl-C or SIGTERM.

A batch system's settings (cores, memory, queue, account, walltime, ...) are
dask-jobqueue's own, read from dask's configuration (``jobqueue.slurm.*`` in
``~/.config/dask/jobqueue.yaml``, or ``DASK_JOBQUEUE__SLURM__CORES=8``);
``--cluster-option KEY=VALUE`` overrides them. distributed and dask-jobqueue
are imported only when a cluster is started.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gramlin_analyze.errors import GramlinError, MissingDependencyError

__all__ = [
    "BATCH_SYSTEMS",
    "KINDS",
    "ClusterError",
    "ClusterRequest",
    "ClusterTimeoutError",
    "cluster_address",
]

#: kind -> (dask-jobqueue class, the command that lists a user's jobs)
BATCH_SYSTEMS: dict[str, tuple[str, str]] = {
    "slurm": ("SLURMCluster", "squeue -u $USER"),
    "pbs": ("PBSCluster", "qstat -u $USER"),
    "sge": ("SGECluster", "qstat -u $USER"),
    "lsf": ("LSFCluster", "bjobs"),
}
KINDS: tuple[str, ...] = (*BATCH_SYSTEMS, "local")

_POLL_S = 0.25  # how often the worker count (and a stop request) is checked
_REPORT_EVERY_S = 10.0  # a progress line at least this often while waiting


class ClusterError(GramlinError, RuntimeError):
    """The cluster could not be started with the settings given."""


class ClusterTimeoutError(ClusterError, TimeoutError):
    """The cluster's workers did not come up in time (CLI exit code 2)."""


@dataclass(frozen=True, slots=True)
class ClusterRequest:
    """What the command line asked for: a kind, a number of jobs, settings and a timeout."""

    kind: str
    jobs: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 300.0


@contextmanager
def cluster_address(
    request: ClusterRequest,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    quiet: bool = False,
) -> Iterator[str | None]:
    """Start the cluster, wait for its workers, yield its scheduler's address; shut it down.

    Yields None when ``stop_requested()`` turned true while waiting (the
    caller then runs nothing). Raises :class:`ClusterTimeoutError` when the
    workers are not all up after ``request.timeout`` seconds, naming what was
    submitted and where to look.
    """
    cluster = _start(request)
    try:
        expected = _scale(cluster, request)
        if _wait_for_workers(cluster, request, expected, stop_requested, quiet):
            yield cluster.scheduler_address
        else:
            yield None
    finally:
        cluster.close()


# -- starting -------------------------------------------------------------------------


def _options(request: ClusterRequest) -> dict[str, Any]:
    """The command line's settings as keyword arguments (``log-directory`` -> ``log_directory``)."""
    return {key.replace("-", "_"): value for key, value in request.options.items()}


def _start(request: ClusterRequest):
    """The cluster object (a batch system's with no job yet); a refused setting is a :class:`ClusterError`."""
    if request.kind == "local":
        return _start_local(request)
    if request.kind not in BATCH_SYSTEMS:
        raise ClusterError(f"unknown cluster kind {request.kind!r}: one of {', '.join(KINDS)}")
    cls = getattr(_import_jobqueue(request.kind), BATCH_SYSTEMS[request.kind][0])
    try:
        with warnings.catch_warnings():
            # The dashboard moves to a free port by itself: no need to say so under --quiet.
            warnings.filterwarnings("ignore", "Port .* is already in use", UserWarning)
            return cls(**_options(request))
    except (TypeError, ValueError) as err:
        # dask-jobqueue's messages go on with a code example: its first line says it
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        first = first.removesuffix(":").removesuffix(", for example")
        raise ClusterError(
            f"{request.kind}: cannot start the cluster: {first} (set jobqueue.{request.kind}.* "
            f"in ~/.config/dask/jobqueue.yaml, or --cluster-option KEY=VALUE, "
            f"e.g. cores=8 memory=32GB)"
        ) from err


def _import_jobqueue(kind: str):
    """dask_jobqueue, leaving the SIGINT handler as it was.

    Importing it makes SIGINT call ``sys.exit()`` (its ``runner`` module does so at
    import time): Ctrl-C would then end the command with exit code 0, skipping the
    stop that records finished work and prints how to resume.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        import dask_jobqueue
    except ImportError as err:
        raise MissingDependencyError(
            f"--cluster {kind} needs dask-jobqueue: pip install 'gramlin-analyze[cluster]'"
        ) from err
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    return dask_jobqueue


def _start_local(request: ClusterRequest):
    """A ``LocalCluster`` of ``request.jobs`` worker processes (default: one per core)."""
    from distributed import LocalCluster

    from gramlin_analyze.scheduling import children_ignore_sigint

    settings = {"dashboard_address": None, "silence_logs": 40, **_options(request)}
    n = request.jobs or os.cpu_count() or 1
    try:
        # Its workers ignore the terminal's Ctrl-C (stopping is the driver's to decide), so
        # they start here, in the constructor, while the driver ignores it too.
        with children_ignore_sigint():
            return LocalCluster(n_workers=n, processes=True, **settings)
    except TypeError as err:
        raise ClusterError(f"local: cannot start the cluster: {err}") from err


def _scale(cluster, request: ClusterRequest) -> int:
    """Ask for the jobs (a local cluster has its workers); return how many workers to wait for."""
    if request.kind == "local":
        return len(cluster.worker_spec)
    jobs = request.jobs or 1
    cluster.scale(jobs=jobs)
    # SpecCluster.plan: every worker the jobs will start (a job may run several).
    return len(cluster.plan)


# -- waiting --------------------------------------------------------------------------


def _wait_for_workers(
    cluster, request: ClusterRequest, expected: int, stop_requested, quiet: bool
) -> bool:
    """Wait until ``expected`` workers are up (True) or a stop is asked for (False).

    One line when the count changes, and every few seconds while it does not.
    """
    from distributed import Client

    t0 = time.monotonic()
    last: tuple[int, float] | None = None
    with Client(cluster.scheduler_address, timeout=request.timeout) as client:
        while True:
            up = len(client.nthreads())
            elapsed = time.monotonic() - t0
            if not quiet and (
                last is None or up != last[0] or elapsed - last[1] >= _REPORT_EVERY_S
            ):
                print(
                    f"waiting for {expected} workers: {up}/{expected} up ({elapsed:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                last = (up, elapsed)
            if up >= expected:
                return True
            if stop_requested():
                return False
            if elapsed > request.timeout:
                raise ClusterTimeoutError(_timeout_message(cluster, request, up, expected))
            time.sleep(_POLL_S)


def _timeout_message(cluster, request: ClusterRequest, up: int, expected: int) -> str:
    """One line: which cluster, what was submitted, what to check."""
    head = f"{request.kind}: {up}/{expected} workers up after {request.timeout:g} s"
    if request.kind == "local":
        return f"{head}; check the machine's free memory and the worker processes' errors (--debug)"
    ids = [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]
    submitted = f"jobs {', '.join(ids)}" if ids else "no job id returned"
    status = BATCH_SYSTEMS[request.kind][1]
    return (
        f"{head} ({request.jobs or 1} job(s) submitted: {submitted}); check `{status}` "
        f"(queued? failed?) and the jobs' output files, or raise --cluster-timeout"
    )
