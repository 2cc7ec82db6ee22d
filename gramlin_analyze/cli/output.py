"""What commands print: plain lines, rich consoles and tables, a progress bar.

rich is imported by the first message that needs it, so a command that prints
plain lines only (or nothing) never imports it.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar", "console", "human", "out", "say"]


def human(n: float) -> str:
    """A byte count with a binary unit (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def console(quiet: bool = False):
    """A rich console on stderr, for errors and warnings (silent with ``quiet``)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def out():
    """A rich console on stdout, for a command's result."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def say(msg: str, *, err: bool = False) -> None:
    """One plain line (no rich: a message that needs no colour costs no import)."""
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


class ProgressBar:
    """A rich progress bar with steps/s and MB/s; silent with --quiet.

    The bar (and rich) starts with the first task: a run with nothing to do
    prints no bar and imports no rich.
    """

    def __init__(self, quiet: bool, label: str):
        self.quiet = quiet
        self.label = label
        self.bar = None
        self.task = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        return self

    def _start(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console(),
            transient=False,
        )
        self.bar.__enter__()

    def __call__(self, done: int, total: int, nbytes: int = 0) -> None:
        if self.quiet or (self.bar is None and not total):
            return
        if self.bar is None:
            self._start()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = f"{done / dt:.2f} steps/s"
        if nbytes:
            rate += f"  {nbytes / dt / 1e6:.0f} MB/s"
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total, rate=rate)
        self.bar.update(self.task, completed=done, total=total, rate=rate)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
