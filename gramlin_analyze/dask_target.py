"""Which Dask client a run's tasks go to, checked before any store is touched.

A ``distributed.Client`` passed in is used as is; a cluster or a scheduler's
address is connected here within a bounded time; with none, the active
``distributed`` client is used when there is one. Workers run elsewhere, so
every path sent to a task is made absolute first (:func:`task_path`) and one
round on every worker (:meth:`Target.check_workers`) finds a path it cannot
reach or a model it cannot import before any task runs: one error, not one
failure per step.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gramlin_analyze.errors import GramlinError, UsageError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "SchedulerUnreachableError",
    "Target",
    "WorkerCheck",
    "WorkerSetupError",
    "dask_target",
    "task_path",
    "worker_budgets",
    "worker_cores",
]


#: Seconds a scheduler (and its first worker) may take to answer before the run is refused,
#: unless ``connect_timeout=`` or dask's ``distributed.comm.timeouts.connect`` says otherwise.
CONNECT_TIMEOUT_S = 10.0

_log = logging.getLogger("gramlin_analyze")


class SchedulerUnreachableError(GramlinError, ConnectionError):
    """No Dask scheduler (or no worker of it) answered in time (CLI exit code 2)."""


class WorkerSetupError(GramlinError, RuntimeError):
    """A worker cannot reach a path of the run or import its model: found before any task ran."""


def task_path(path: str | os.PathLike) -> str:
    """``path`` as a task on any worker must see it: absolute (from the driver's working
    directory), or a URL unchanged. Workers run elsewhere, in another directory."""
    text = os.fspath(path)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


@dataclass(frozen=True, slots=True)
class WorkerCheck:
    """What every worker must reach before a task runs (absolute paths)."""

    writable: tuple[str, ...] = ()
    readable: tuple[str, ...] = ()
    model: str | None = (
        None  # a model factory to import: ``pkg.mod:build`` or ``/abs/file.py:build``
    )
    creatable: tuple[str, ...] = ()  # not there yet: the directory they go in must be writable
    device: str = "cpu"  # where capture runs: a GPU every worker must have


@dataclass(frozen=True, slots=True)
class Target:
    """Where one run's tasks go: a connected Dask client, or None (threads or a LocalCluster)."""

    client: Any
    where: str = ""  # "on the Dask scheduler at tcp://…", for the report and the log

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` where the tasks run: on a worker, or in this process without a client.

        For work the driver should not do itself (building a model to check it).
        """
        if self.client is None:
            return fn(*args)
        return self.client.submit(fn, *args, pure=False).result()

    def check_workers(self, check: WorkerCheck) -> None:
        """One round on every worker before the tasks: the first problem is one error."""
        if self.client is None:
            return
        found = self.client.run(_check_on_worker, check)
        for addr in sorted(found):
            for what, path, detail in found[addr]:
                raise WorkerSetupError(_WORKER_PROBLEMS[what].format(p=path, w=addr, e=detail))


_WORKER_PROBLEMS = {
    "write": "{p}: not writable on worker {w} ({e}); give the workers write access, or put the "
    "store where they can write (a shared file system or an fsspec URL)",
    "read": "{p}: cannot be read on worker {w} ({e}); put it on a file system the workers share, "
    "or pass a URL they can read",
    "import": "{p} cannot be imported on worker {w} ({e}): install it on the workers, or pass a "
    "file path they can read",
    "device": "no CUDA device on worker {w} ({e}); run without --device {p}, or on workers with "
    "a GPU",
}


def _check_on_worker(check: WorkerCheck) -> list[tuple[str, str, str]]:
    """On a worker: ``(what, path, why)`` for each path it cannot use and a model it cannot import."""
    problems = []
    for what, paths, mode in (
        ("write", check.writable, os.W_OK),
        ("read", check.readable, os.R_OK),
    ):
        for p in paths:
            if not os.path.exists(p):
                problems.append((what, p, "no such file or directory"))
            elif not os.access(p, mode):
                problems.append((what, p, "permission denied"))
    for p in check.creatable:
        parent = _existing_parent(p)
        if not os.access(parent, os.W_OK):
            problems.append(("write", p, f"{parent} is not writable"))
    if check.device != "cpu":
        from gramlin_analyze.capture.device import device_problem

        problem = device_problem(check.device)
        if problem:
            problems.append(("device", check.device, problem))
    if check.model:
        from gramlin_analyze.capture.models import check_factory

        try:
            check_factory(check.model)
        except Exception as err:  # the user's module may raise anything while importing
            cause = err.__cause__ or err
            problems.append(("import", check.model, f"{type(cause).__name__}: {cause}"))
    return problems


def _existing_parent(path: str) -> str:
    """The nearest directory above ``path`` that exists (where it would be created)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


@contextmanager
def dask_target(
    client: Any = None,
    *,
    scheduler: Any = None,
    workers: int | None = None,
    connect_timeout: float | None = None,
) -> Iterator[Target]:
    """The Dask client a run uses, answering before the store is touched; closed after if opened here.

    ``client`` (or its old name ``scheduler``): a ``distributed.Client``, used as
    is; a cluster (anything with ``scheduler_address``) or an address, connected
    here. Neither, and no ``workers``: the active ``distributed`` client, if
    ``distributed`` was imported and one is running; else None (threads).
    """
    if client is not None and scheduler is not None:
        raise UsageError("pass client= or scheduler= (its older name), not both")
    given = client if client is not None else scheduler
    if isinstance(given, str) and not given:  # an empty address: none, as before
        given = None
    if given is None and workers is None:
        given = _active_client()
        if given is not None:
            yield _announce(Target(given, f"on the active Dask client at {_address(given)}"))
            return
    if given is None:
        yield Target(None)
        return
    timeout = _connect_timeout(connect_timeout)
    from distributed import Client

    if isinstance(given, Client):
        _check_answers(given, timeout)
        yield _announce(Target(given, f"on the Dask client at {_address(given)}"))
        return
    opened = _connect(given, timeout)
    try:
        yield _announce(Target(opened, f"on the Dask scheduler at {_address(opened)}"))
    finally:
        opened.close()


def _announce(target: Target) -> Target:
    _log.info("tasks run %s", target.where)
    return target


def _address(client: Any) -> str:
    return str(getattr(client.scheduler, "address", None) or "an unknown address")


def _active_client() -> Any:
    """The running default ``distributed`` client; never imports ``distributed`` to look."""
    if "distributed" not in sys.modules:
        return None
    from distributed import Client

    try:
        active = Client.current(allow_global=True)
    except ValueError:  # none
        return None
    return active if active.status == "running" else None


def _connect_timeout(given: float | None) -> float:
    """``given``, else dask's ``distributed.comm.timeouts.connect`` where set, else the default."""
    if given is not None:
        return float(given)
    import dask
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.comm.timeouts.connect", None)
    shipped = [d for d in dask.config.defaults if "distributed" in d]
    default = (
        shipped[0].get("distributed", {}).get("comm", {}).get("timeouts", {}) if shipped else {}
    )
    if value is None or value == default.get("connect"):
        return CONNECT_TIMEOUT_S
    return float(parse_timedelta(value, default="s"))


def _unreachable(address: str, timeout: float, detail: str) -> SchedulerUnreachableError:
    return SchedulerUnreachableError(
        f"{address}: no Dask scheduler answered within {timeout:g} s ({detail}); start one there "
        "(`dask scheduler`), check the address, or allow more time (connect_timeout= in Python; "
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=30s for the command)"
    )


def _connect(given: Any, timeout: float) -> Any:
    """A new client of a cluster or scheduler address, with at least one worker, or an error."""
    from distributed import Client

    address = getattr(given, "scheduler_address", given)
    if not isinstance(address, str):
        raise UsageError(
            "client= takes a distributed.Client, a Dask cluster (with scheduler_address) or a "
            f"scheduler address such as tcp://host:8786, not a {type(given).__name__}"
        )
    try:
        opened = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise _unreachable(address, timeout, type(err).__name__) from err
    try:
        _wait_for_a_worker(opened, address, timeout)
    except BaseException:
        opened.close()
        raise
    return opened


def _check_answers(client: Any, timeout: float) -> None:
    """A client passed in: its scheduler answers, and has a worker, within ``timeout``."""
    address = _address(client)
    if client.status != "running":
        raise _unreachable(address, timeout, f"the client is {client.status}")
    try:
        client.sync(client.scheduler.identity, callback_timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise _unreachable(address, timeout, type(err).__name__) from err
    _wait_for_a_worker(client, address, timeout)


def _wait_for_a_worker(client: Any, address: str, timeout: float) -> None:
    """Tasks sent to a scheduler without workers would wait for ever: refuse instead."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise SchedulerUnreachableError(
            f"{address}: the Dask scheduler has no worker (none joined within {timeout:g} s); start "
            "workers (`dask worker " + address + "`) or scale the cluster, then run again"
        ) from err


# -- the workers' cores --------------------------------------------------------------


def worker_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity: a batch job's cores, not the node's)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def _describe_worker(dask_worker=None) -> tuple[str, tuple[int, ...], int]:
    """On a worker: its machine, its cores, and how many tasks it runs at once."""
    import socket

    return socket.gethostname(), worker_cores(), int(dask_worker.state.nthreads)


def worker_budgets(client) -> dict[str, int]:
    """Each worker's threads per task: its cores over the task slots sharing them.

    The workers on one machine bound to the same cores (a ``LocalCluster``,
    ``dask worker --nworkers 4``, ``processes: 4`` of a jobqueue job) share
    them; workers bound to other cores (two batch jobs on one node) do not.
    """
    found = client.run(_describe_worker)
    slots: dict[tuple[str, tuple[int, ...]], int] = {}
    for host, cores, nthreads in found.values():
        slots[(host, cores)] = slots.get((host, cores), 0) + nthreads
    return {
        addr: max(1, len(cores) // slots[(host, cores)]) for addr, (host, cores, _) in found.items()
    }
