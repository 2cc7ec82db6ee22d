"""A real ``dask scheduler`` and ``dask worker`` processes on loopback, started and ended cleanly.

The tests that need a cluster a user would start by hand (``dask scheduler``
in one terminal, ``dask worker tcp://…`` in others) and the scaling benchmarks
use this module, so that both exercise the same commands: no ``LocalCluster``,
which starts workers the library's own way.

Each command runs in a session (process group) of its own, so that a worker's
nanny and the worker process it spawns are ended together (``SIGKILL`` of the
group is a machine that died), and so that a teardown after a failed test
leaves no process behind. The scheduler writes its address to a scheduler
file: no port is guessed, so two runs at once cannot collide.

Worker processes get one BLAS/OpenMP thread (``OMP_NUM_THREADS=1`` and the
like): with one Dask thread per worker and as many workers as cores, more
kernel threads only oversubscribe the cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: Environment of every worker process: one kernel thread each (see the module docstring).
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
START_TIMEOUT_S = 60.0  # a hung start fails the caller instead of hanging it
TERM_WAIT_S = 5.0  # SIGTERM, then SIGKILL of what is left after this


def dask_exe() -> list[str]:
    """The ``dask`` command of this interpreter's environment (as a user runs it)."""
    script = Path(sys.executable).parent / "dask"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distributed.cli.dask"]


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is alive; zombies (dead, not yet reaped) are not.

    Read from ``/proc`` where there is one: signal 0 also reaches zombies, and
    in a container a worker orphaned by its dead nanny may never be reaped.
    """
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited while we looked
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def end_group(proc: subprocess.Popen, *, kill: bool = False) -> None:
    """End ``proc``'s process group: SIGTERM and a bounded wait, then SIGKILL (at once if ``kill``)."""
    pgid = proc.pid  # start_new_session: the group's id is the leader's pid
    sig = signal.SIGKILL if kill else signal.SIGTERM
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + TERM_WAIT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()  # reap the leader, else it stays a zombie and the group looks alive
        time.sleep(0.05)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=TERM_WAIT_S)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class DaskProcesses:
    """A scheduler process, its address, and the worker commands started against it."""

    workdir: Path
    scheduler: subprocess.Popen | None = None
    address: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list = field(default_factory=list)

    def _spawn(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        """Start a command in a session of its own, its output in ``workdir/<name>.log``."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def start_scheduler(self) -> str:
        """Start ``dask scheduler`` on a free loopback port; return its ``tcp://`` address."""
        sfile = self.workdir / "scheduler.json"
        args = [*dask_exe(), "scheduler", "--host", "127.0.0.1", "--port", "0"]
        args += ["--no-dashboard", "--scheduler-file", str(sfile)]
        self.scheduler = self._spawn(args, "scheduler")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {self.log_tail('scheduler')}")
            try:
                self.address = json.loads(sfile.read_text())["address"]
                return self.address
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.05)
        raise TimeoutError(f"dask scheduler not up after {START_TIMEOUT_S} s")

    def start_worker(self, *, nthreads: int = 1, name: str | None = None) -> subprocess.Popen:
        """Start one ``dask worker`` (a nanny and its worker process) in a group of its own."""
        name = name or f"worker-{len(self.workers)}"
        local = self.workdir / name
        local.mkdir(exist_ok=True)
        args = [*dask_exe(), "worker", self.address, "--nworkers", "1"]
        args += ["--nthreads", str(nthreads), "--no-dashboard", "--name", name]
        args += ["--local-directory", str(local), "--death-timeout", "60"]
        proc = self._spawn(args, name, ONE_THREAD)
        self.workers.append(proc)
        return proc

    def wait_for_workers(
        self, n: int, timeout: float = START_TIMEOUT_S, *, task_stream: bool = True
    ) -> dict[str, int]:
        """Wait until ``n`` workers are connected; return worker address -> worker pid.

        With ``task_stream``, also starts the scheduler's task stream, so that a
        client asking later which tasks finished (``Client.get_task_stream``)
        sees all of them (benchmarks leave it off: it costs scheduler CPU).
        """
        from distributed import Client

        with Client(self.address, timeout=timeout, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout)
            if task_stream:
                client.get_task_stream()
            return client.run(os.getpid)

    def processes(self) -> list[int]:
        """Every process of the cluster: the scheduler, each nanny and its worker."""
        import psutil

        out = []
        for proc in [self.scheduler, *self.workers]:
            if proc is not None:
                top = psutil.Process(proc.pid)
                out += [top.pid, *(c.pid for c in top.children(recursive=True))]
        return out

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of a process's log: what a failed start says about itself."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        """Workers first (so none reconnects), then the scheduler; every group ended."""
        for proc in self.workers:
            end_group(proc)
        if self.scheduler is not None:
            end_group(self.scheduler)
        for log in self.logs:
            log.close()


@contextmanager
def dask_processes(workdir: Path, n_workers: int, *, nthreads: int = 1):
    """A scheduler and ``n_workers`` workers up and connected; all ended on exit, even on error."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    procs = DaskProcesses(workdir)
    try:
        procs.start_scheduler()
        for _ in range(n_workers):
            procs.start_worker(nthreads=nthreads)
        if n_workers:
            procs.wait_for_workers(n_workers)
        yield procs
    finally:
        procs.close()
