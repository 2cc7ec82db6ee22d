"""A second process that draws part of a long run's figures.

Drawing and rendering a figure is matplotlib work that holds the GIL; on a long,
wide run it is most of a report's time (``benchmarks/report.py``). A helper process
imports and reads the store while the parent does the same, then draws the figures
the parent hands it. It is a fresh interpreter (``python -c``), not a
``multiprocessing`` child: those re-run the top level of the user's script, and fork
is unsafe beside zarr's I/O thread. If the helper fails or dies, the parent draws its
figures itself, and so raises any error where the user sees it.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MIN_CELLS", "Helper", "Job", "cells", "usable_cpus"]

#: Runs with at least this many (step, layer) cells draw in two processes; smaller
#: reports finish before a helper would have imported matplotlib.
MIN_CELLS = 10_000

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cells(store: str, storage_options: dict | None) -> int:
    """steps x layers of ``/metrics`` from the store's metadata alone; 0 when unreadable
    (the report's own read then says what is wrong)."""
    import zarr

    try:
        root = zarr.open_group(store, mode="r", storage_options=storage_options)
        return int(root["steps/step"].shape[0]) * int(root["metrics/layer"].shape[0])
    except (LookupError, OSError, ValueError, TypeError):
        return 0


@dataclass(frozen=True, slots=True)
class Job:
    """What the helper needs to read the store and export figures as the parent would."""

    store: str
    layers: list[str] | None
    storage_options: dict | None
    png_dir: Path | None
    svg: bool


@dataclass(slots=True)
class Helper:
    """The helper process; the parent talks to it by pickles on its stdin and stdout."""

    process: subprocess.Popen
    handed: list[str] = field(default_factory=list)
    answered: bool = False

    @classmethod
    def start(cls, job: Job) -> Helper:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-c", "from gramlin_analyze.report.parallel import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        helper = cls(proc)
        helper._send(job)
        return helper

    def _send(self, obj) -> None:
        try:
            pickle.dump(obj, self.process.stdin)
            self.process.stdin.flush()
        except OSError:  # it died: result() says so
            pass

    def hand(self, names: list[str]) -> None:
        """Give the helper these figures to draw (none: it exits)."""
        self.handed = list(names)
        self._send(self.handed)

    def result(self):
        """``(drawn, files, missing)`` of the figures handed over, or None if the helper
        failed or died."""
        if not self.handed:
            return ([], [], [])
        try:
            out = pickle.load(self.process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            return None
        self.answered = True
        return out

    def close(self) -> None:
        """Stop the helper: it exits on its own once it has answered; otherwise (nothing
        handed, an error or Ctrl-C in the parent) it is terminated."""
        if not self.answered:
            self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self.process.wait()


def serve() -> None:
    """The helper's main: read the job, the store, the figure names; draw; answer.

    Any failure exits unanswered; the parent then draws the figures itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    warnings.filterwarnings("ignore")  # the parent shows the store's warnings once
    from gramlin_analyze.plot._registry import FIGURES
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.build import draw_figures, exporter

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    job: Job = pickle.load(stdin)
    src = load(job.store, layers=job.layers, storage_options=job.storage_options)
    names = set(pickle.load(stdin))
    if names:
        specs = [s for s in FIGURES if s.name in names]
        pickle.dump(draw_figures(src, specs, exporter(job.png_dir, job.svg), None), stdout)
        stdout.flush()
