"""The ``gramlin-analyze`` command line.

Exit codes: 0 ok, 1 some inputs failed (the rest landed), 2 bad usage or a
store/lock problem. One line per error; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings

from gramlin_analyze._version import __version__
from gramlin_analyze.errors import GramlinError

__all__ = ["main", "build_parser"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def _out():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


class _Progress:
    """A rich progress bar with steps/s and MB/s; silent with --quiet."""

    def __init__(self, quiet: bool, label: str):
        self.quiet = quiet
        self.label = label
        self.bar = None
        self.task = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                console=_console(), transient=False,
            )
            self.bar.__enter__()
        return self

    def __call__(self, done: int, total: int, nbytes: int = 0) -> None:
        if self.bar is None:
            return
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


# -- commands ----------------------------------------------------------------------


def cmd_scan(args) -> int:
    from rich.table import Table

    from gramlin_analyze.io.discovery import scan
    from gramlin_analyze.io.registry import get_reader

    opts = {"state_dict_key": args.state_dict_key} if args.state_dict_key else None
    sources = scan(args.directory, format=args.format, order=args.order, reader_options=opts)
    table = Table(title=f"{len(sources)} checkpoints in {args.directory}")
    for col in ("step", "format", "files", "size", "#tensors", "path"):
        table.add_column(col, justify="right" if col in ("step", "files", "size", "#tensors") else "left", overflow="fold", no_wrap=col != "path")
    failed = 0
    for s in sources:
        try:
            reader = get_reader(s.format, **(opts or {})) if s.format in ("torch", "lightning") and opts else get_reader(s.format)
            n = str(len(reader.list_tensors(s.path)))
        except (GramlinError, OSError, KeyError, ValueError, RuntimeError) as err:
            n = "unreadable"
            failed += 1
            _console(args.quiet).print(f"[red]error:[/red] {err}")
        table.add_row(str(s.step), s.format, str(len(s.files)), _human(s.bytes), n, str(s.path))
    _out().print(table)
    for path, why in getattr(sources, "skipped", []):
        _console(args.quiet).print(f"skipped {path}: {why}")
    return 1 if failed else 0


def cmd_ingest(args) -> int:
    from gramlin_analyze.ingest import ingest

    err = _console()

    def on_error(msg: str) -> None:
        err.print(f"[red]error:[/red] {msg}", soft_wrap=True)

    with _Progress(args.quiet, "ingest") as bar:
        report = ingest(
            args.directory, args.store, layers=args.layers, exclude=args.exclude,
            format=args.format, order=args.order, state_dict_key=args.state_dict_key,
            workers=args.workers, threads=args.threads, scheduler=args.scheduler,
            break_lock=args.break_lock, progress=bar, on_error=on_error,
        )
    if not args.quiet:
        n_new = len(report.ingested)
        msg = (
            f"{report.store}: {n_new} checkpoint(s) ingested, {len(report.skipped)} unchanged, "
            f"{len(report.failed)} failed in {report.seconds:.1f} s"
        )
        if report.seconds > 0 and report.bytes_read:
            msg += f" ({report.bytes_read / report.seconds / 1e6:.0f} MB/s)"
        _out().print(msg)
        for step, n in sorted(report.nonfinite.items()):
            err.print(f"[yellow]warning:[/yellow] step {step}: {n} NaN/Inf values stored and flagged (/steps.nonfinite)")
    return report.exit_code


def cmd_info(args) -> int:
    from gramlin_analyze.store.info import store_info

    _out().print(store_info(args.store))
    return 0


def cmd_validate(args) -> int:
    from gramlin_analyze.store.validate import validate_store

    notes: list[str] = []
    problems = validate_store(args.store, notes=notes)
    for n in notes:
        _console(args.quiet).print(f"note: {n}", soft_wrap=True, markup=False)
    if problems:
        err = _console()
        for p in problems:
            err.print(f"[red]invalid:[/red] {p}", soft_wrap=True)
        return 1
    if not args.quiet:
        _out().print(f"{args.store}: valid")
    return 0


# -- parser ------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _add_discovery(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", help="read every checkpoint with this reader (default: guess per file)")
    p.add_argument(
        "--order", choices=("name", "mtime"),
        help="resolve step ambiguity: keep the last checkpoint of a step by name or mtime; "
        "number checkpoints by this order when none has a step",
    )
    p.add_argument("--state-dict-key", help="key of the model state dict inside a nested .pt/.ckpt (e.g. ema.model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramlin-analyze",
        description="Weight Gram matrices, virtual covariance and target linearity over saved training runs.",
    )
    parser.add_argument("--version", action="version", version=f"gramlin-analyze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="list the checkpoints that ingest would read (reads no tensor bytes)")
    p.add_argument("directory")
    _add_discovery(p)
    _add_common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("ingest", help="write checkpoints (weights, activations) into a store")
    p.add_argument("directory")
    p.add_argument("--store", "-o", help="store path or URL (default: DIRECTORY.zarr)")
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="layers to store (glob over normalized names)")
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="layers to leave out")
    _add_discovery(p)
    p.add_argument("--workers", type=int, help="run on a LocalCluster of N processes")
    p.add_argument("--threads", type=int, help="threads of the default threaded scheduler")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument("--break-lock", action="store_true", help="remove a remote store's lock left by a dead writer")
    _add_common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="summarize a store: steps, layers, shapes, statuses, provenance")
    p.add_argument("store")
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate", help="check a store against the JSON Schemas and its chunks")
    p.add_argument("store")
    _add_common(p)
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _console().print("interrupted; re-run the same command to finish (completed steps are kept)")
        return 130
    except (GramlinError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
