"""``watch``: follow a live training directory, ingesting each checkpoint once it is complete,
then analyzing incrementally and refreshing the report.

Each pass is an ordinary :func:`~gramlin_analyze.ingest.ingest` restricted to the checkpoints
:class:`~gramlin_analyze.ingest.complete.Completeness` calls complete, so a watcher killed at
any point leaves the store an ingest leaves, and the next watcher (or ingest) resumes it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gramlin_analyze.errors import MissingDependencyError, UsageError
from gramlin_analyze.ingest.complete import Completeness
from gramlin_analyze.ingest.driver import default_store_path, ingest
from gramlin_analyze.ingest.notify import Wakeup
from gramlin_analyze.ingest.plan import is_store
from gramlin_analyze.io.remote import is_url

__all__ = ["WatchPass", "WatchReport", "pid_alive", "watch"]

#: seconds a checkpoint's files must stay unmodified when the caller gives none
DEFAULT_SETTLE = 1.0
#: options of ``ingest`` that ``watch`` sets itself
_OWN = frozenset({"directory", "store", "settle_seconds", "select", "progress"})


@dataclass
class WatchPass:
    """One pass of a watcher: what it ingested, analyzed and wrote, and when it finished."""

    number: int
    ingested: list[int]
    failed: dict[int, str]
    analyzed: int  # (step, layer) results computed
    report: Path | None
    ingest_seconds: float
    analyze_seconds: float
    finished_at: float  # time.time() once the metrics (and the report) were written
    final: bool = False  # the pass after the training process exited: every checkpoint


@dataclass
class WatchReport:
    """What one :func:`watch` did, and why it stopped (``signal``, ``stop``, ``idle``, ``pid``)."""

    store: str
    passes: list[WatchPass] = field(default_factory=list)
    stopped_by: str = ""

    @property
    def ingested(self) -> list[int]:
        return sorted({s for p in self.passes for s in p.ingested})

    @property
    def failed(self) -> dict[int, str]:
        return self.passes[-1].failed if self.passes else {}

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def watch(
    directory: str | os.PathLike,
    store: str | os.PathLike | None = None,
    *,
    settle_seconds: float = DEFAULT_SETTLE,
    analyze: bool | dict[str, Any] = False,
    report: str | os.PathLike | None = None,
    until_idle: float | None = None,
    pid: int | None = None,
    poll_seconds: float = 0.25,
    notify: bool = True,
    stop: threading.Event | None = None,
    on_pass: Callable[[WatchPass], None] | None = None,
    **ingest_options: Any,
) -> WatchReport:
    """Ingest the checkpoints of a live run as each one completes, until told to stop.

    Parameters
    ----------
    directory, store
        The run directory (local) and the store, as for :func:`~gramlin_analyze.ingest.ingest`.
    settle_seconds
        A checkpoint whose files (and the other files of its own directory) were modified less
        than this long ago is not complete yet; complete ones must also parse.
    analyze, report
        After each pass that ingested something: ``analyze`` the store (``True``, or a dict of
        :func:`~gramlin_analyze.analysis.analyze` options; only new results are computed) and
        rewrite the HTML ``report`` at this path.
    until_idle, pid, stop
        Stop once nothing under ``directory`` changed for ``until_idle`` seconds; once process
        ``pid`` (the training) exited, after a last pass over every checkpoint; or when
        ``stop`` is set. From the command line, SIGINT/SIGTERM stop after the current pass's
        running tasks (the store consistent, completed steps kept).
    poll_seconds, notify
        Look again this often; with ``notify`` and ``watchdog`` installed, also as soon as a
        file-system event arrives.
    on_pass
        Called with each :class:`WatchPass`.
    **ingest_options
        Any other option of :func:`~gramlin_analyze.ingest.ingest` (``capture``, ``layers``, …).

    Returns
    -------
    WatchReport
        Each pass, and why the watch stopped.

    Raises
    ------
    UsageError
        Before anything is watched: not a local directory, a non-positive time, ``pid`` not
        running; and whatever an ingest pass raises (the store is then as that ingest left it).

    Examples
    --------
    >>> ga.watch("runs/live", "live.zarr", analyze=True, pid=trainer.pid)  # doctest: +SKIP
    """
    w = _Watcher.check(
        directory, store, settle_seconds, analyze, report, until_idle, pid, poll_seconds
    )
    unknown = _OWN & ingest_options.keys()
    if unknown:
        raise UsageError(f"watch sets {', '.join(sorted(unknown))} itself; leave them out")
    w.ingest_options, w.stop, w.on_pass = ingest_options, stop, on_pass
    return w.run(notify=notify)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc here: kill's answer stands
        return True
    return state not in ("Z", "X")


@dataclass
class _Watcher:
    """A watch's settings and its loop."""

    directory: Path
    store: str
    settle: float
    analyze: dict[str, Any] | None
    report: Path | None
    until_idle: float | None
    pid: int | None
    poll: float
    ingest_options: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event | None = None
    on_pass: Callable[[WatchPass], None] | None = None

    @classmethod
    def check(cls, directory, store, settle, analyze, report, until_idle, pid, poll) -> _Watcher:
        """The settings, each checked: one usage error before anything is watched."""
        if is_url(directory) or not Path(directory).is_dir():
            raise UsageError(f"{directory}: --watch follows a local run directory; pass one")
        for name, value in (("--settle", settle), ("--poll", poll), ("--until-idle", until_idle)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be a positive number of seconds, got {value}")
        if pid is not None and not pid_alive(pid):
            raise UsageError(f"--pid {pid}: no such process running; pass the training's pid")
        if report is not None:
            _check_report_dependency()
        return cls(
            directory=Path(directory),  # as given: the manifest's paths are a plain ingest's
            store=str(store) if store is not None else default_store_path(directory),
            settle=float(settle),
            analyze=(analyze if isinstance(analyze, dict) else {}) if analyze else None,
            report=Path(report) if report is not None else None,
            until_idle=until_idle,
            pid=pid,
            poll=float(poll),
        )

    def run(self, *, notify: bool) -> WatchReport:
        """Pass after pass, each over the checkpoints complete by then, until a stop."""
        out = WatchReport(store=self.store)
        tracker = Completeness(
            self.directory,
            self.settle,
            format=self.ingest_options.get("format"),
            order=self.ingest_options.get("order"),
            reader_options=_reader_options(self.ingest_options),
            exclude=None if is_url(self.store) else Path(self.store).resolve(),
        )
        handed: dict[str, str] = {}  # {source_path: stat key} given to an ingest
        # a store left by an earlier watcher gets a first pass at once (analyze what it lacks)
        resume = is_store(self.store, self.ingest_options.get("storage_options"))
        last_activity = time.time()
        with Wakeup(self.directory, notify=notify) as wake:
            while True:
                out.stopped_by = self._stopping()
                if out.stopped_by:
                    break
                if self.pid is not None and not pid_alive(self.pid):
                    # the writer is gone, so every file is final: one last pass over all
                    out.stopped_by = "pid" if self._pass(out, None) else self._stopping()
                    break
                ready = tracker.ready()
                if any(handed.get(p) != k for p, k in ready.items()) or resume:
                    resume = False
                    if not self._pass(out, ready):
                        continue  # stopped meanwhile: the loop's test says why
                    handed.update(ready)
                    last_activity = time.time()
                last_activity = max(last_activity, tracker.newest_mtime())
                if self.until_idle is not None and time.time() - last_activity >= self.until_idle:
                    out.stopped_by = "idle"
                    break
                wake.wait(self.poll)
        return out

    def _stopping(self) -> str:
        """Why to stop now ("" to go on): a signal to this command, or ``stop`` set."""
        from gramlin_analyze.scheduling import stop_requested

        if stop_requested():
            return "signal"
        if self.stop is not None and self.stop.is_set():
            return "stop"
        return ""

    def _pass(self, out: WatchReport, ready: dict[str, str] | None) -> bool:
        """Ingest the ``ready`` checkpoints (None: all), then analyze and report; False when
        a stop came before the pass finished (what finished is kept)."""
        t0 = time.perf_counter()
        if ready is None:
            rep = ingest(self.directory, self.store, **self.ingest_options)
        else:
            rep = ingest(
                self.directory,
                self.store,
                settle_seconds=self.settle,  # files still being written are not even hashed
                select=lambda s: ready.get(str(s.path)) == s.stat_key,
                **self.ingest_options,
            )
        t1 = time.perf_counter()
        fresh = bool(rep.ingested) or not out.passes  # a restarted watcher finishes analyze
        analyzed = 0
        if self._stopping():
            return False
        if self.analyze is not None and fresh:
            from gramlin_analyze.analysis import analyze

            analyzed = analyze(self.store, **self.analyze).computed
            if self._stopping():
                return False
        t2 = time.perf_counter()
        if self.report is not None and fresh:
            from gramlin_analyze.report.build import build_report

            build_report(self.store, self.report, processes=1)
        done = WatchPass(
            number=len(out.passes) + 1,
            ingested=sorted(rep.ingested),
            failed=dict(rep.failed),
            analyzed=analyzed,
            report=self.report if fresh else None,
            ingest_seconds=t1 - t0,
            analyze_seconds=t2 - t1,
            finished_at=time.time(),
            final=ready is None,
        )
        out.passes.append(done)
        if self.on_pass is not None:
            self.on_pass(done)
        return True


def _reader_options(options: dict[str, Any]) -> dict[str, Any]:
    """The reader options ``ingest`` would derive from the same keyword options."""
    out: dict[str, Any] = {}
    if options.get("state_dict_key"):
        out["state_dict_key"] = options["state_dict_key"]
    if options.get("allow_torchscript_code"):
        out["allow_code"] = True
    return out


def _check_report_dependency() -> None:
    """The report needs matplotlib: say so before watching, not after the first checkpoint."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError(
            "--report draws with matplotlib, which is not installed: "
            "pip install gramlin-analyze[plot], or leave --report out"
        )
