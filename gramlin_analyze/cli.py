"""The ``gramlin-analyze`` command line.

Exit codes: 0 ok, 1 some inputs failed (the rest landed), 2 bad usage or a
store/lock problem, 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM: ``ingest``
and ``analyze`` then start no new task, record the ones running, and print the
command that finishes the run. One line per error; ``--debug`` shows tracebacks.

Heavy libraries are imported by the commands that need them, so ``--help``
and a run with nothing to do start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

from gramlin_analyze._version import __version__
from gramlin_analyze.errors import GramlinError, UsageError

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
            console=_console(),
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


def _say(msg: str, *, err: bool = False) -> None:
    """One plain line (no rich: a message that needs no colour costs no import)."""
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


# -- commands ----------------------------------------------------------------------


def _relative(path, directory) -> str:
    """``path`` relative to the scanned directory (named in the table title) when under it."""
    p, d = Path(path), Path(directory)
    try:
        return str(p.resolve().relative_to(d.resolve())) if d.is_dir() else str(p)
    except ValueError:
        return str(p)


def cmd_scan(args) -> int:
    from rich.table import Table

    from gramlin_analyze.io.discovery import scan
    from gramlin_analyze.io.registry import reader_for

    opts = {"state_dict_key": args.state_dict_key} if args.state_dict_key else None
    sources = scan(
        args.directory,
        format=args.format,
        order=args.order,
        reader_options=opts,
        settle_seconds=args.settle,
    )
    table = Table(title=f"{len(sources)} checkpoints in {args.directory}")
    for col in ("step", "format", "files", "size", "#tensors", "path"):
        table.add_column(
            col,
            justify="right" if col in ("step", "files", "size", "#tensors") else "left",
            overflow="fold",
            no_wrap=col != "path",
        )
    failed = 0
    for s in sources:
        try:
            reader = reader_for(s.format, opts)
            n = str(len(reader.list_tensors(s.path)))
        except (GramlinError, OSError, KeyError, ValueError, RuntimeError) as err:
            n = "unreadable"
            failed += 1
            _console(args.quiet).print(f"[red]error:[/red] {err}")
        table.add_row(
            str(s.step),
            s.format,
            str(len(s.files)),
            _human(s.bytes),
            n,
            _relative(s.path, args.directory),
        )
    _out().print(table)
    for path, why in getattr(sources, "skipped", []):
        _console(args.quiet).print(f"skipped {path}: {why}")
    return 1 if failed else 0


def cmd_ingest(args) -> int:
    from gramlin_analyze.ingest import ingest

    def on_error(msg: str) -> None:
        _console().print(f"[red]error:[/red] {msg}", soft_wrap=True)

    capture = None
    if args.model or args.mlp_activation:
        if not args.probe:
            raise UsageError("capturing activations needs a probe set: pass --probe FILE")
        from gramlin_analyze.capture.task import CaptureConfig

        capture = CaptureConfig(
            probe=args.probe,
            model=None if args.model == "torchscript" else args.model,
            torchscript=args.model == "torchscript",
            mlp_activation=args.mlp_activation,
            loss=args.loss,
            reduction=args.reduction,
            batch_size=args.batch_size,
            dtype=args.activations_dtype,
            extra_layers=args.extra_layers or [],
            pool=args.pool,
            agop=args.capture_agop,
            agop_projections=args.agop_projections,
            strict=not args.no_strict,
        )
    elif args.probe and not args.activations:
        raise UsageError(
            "--probe needs a model to capture with: --model pkg.module:build | file.py:build | torchscript, "
            "or --mlp-activation relu|gelu|tanh|… for plain MLP state dicts (or --activations DIR)"
        )
    with _Progress(args.quiet, "ingest") as bar:
        report = ingest(
            args.directory,
            args.store,
            layers=args.layers,
            exclude=args.exclude,
            format=args.format,
            order=args.order,
            state_dict_key=args.state_dict_key,
            settle_seconds=args.settle,
            allow_torchscript_code=args.allow_torchscript_code,
            capture=capture,
            activations=args.activations,
            probe=args.probe if args.activations else None,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            workers=args.workers,
            threads=args.threads,
            scheduler=args.scheduler,
            storage_options=args.storage_options,
            break_lock=args.break_lock,
            progress=bar,
            on_error=on_error,
        )
    if not args.quiet:
        n_new = len(report.ingested)
        msg = (
            f"{report.store}: {n_new} checkpoint(s) ingested, {len(report.skipped)} unchanged, "
            f"{len(report.failed)} failed in {report.seconds:.1f} s"
        )
        if report.seconds > 0 and report.bytes_read:
            msg += f" ({report.bytes_read / report.seconds / 1e6:.0f} MB/s)"
        _say(msg)
        for path, why in report.scan_skipped:
            _say(f"skipped {path}: {why}", err=True)
        for step, n in sorted(report.nonfinite.items()):
            _console().print(
                f"[yellow]warning:[/yellow] step {step}: {n} NaN/Inf values stored and flagged (/steps.nonfinite)"
            )
    return report.exit_code


def cmd_analyze(args) -> int:
    from gramlin_analyze.analysis import analyze

    with _Progress(args.quiet, "analyze") as bar:
        report = analyze(
            args.store,
            metrics=args.metrics,
            layers=args.layers,
            recompute=args.recompute,
            tl_lambda=args.tl_lambda,
            center_features=args.center_features,
            intercept=args.intercept,
            workers=args.workers,
            threads=args.threads,
            scheduler=args.scheduler,
            storage_options=args.storage_options,
            break_lock=args.break_lock,
            progress=bar,
        )
    if not args.quiet:
        for fam, names in report.partial.items():
            _say(f"{fam}: skipped for layers {', '.join(names)} (their data is missing)", err=True)
        for step, status in sorted(report.skipped_steps.items()):
            _say(f"skipped step {step}: status {status} (not read)", err=True)
        for fam, why in report.unavailable.items():
            _say(f"not computed: {fam}: {why}", err=True)
    for step, layer in report.nonfinite:
        _console(args.quiet).print(
            f"[yellow]warning:[/yellow] step {step}, layer {layer}: NaN/Inf inputs, results are NaN"
        )
    if not args.quiet:
        _say(
            f"{report.store}: {', '.join(report.families) or 'nothing'} -> /metrics: "
            f"{report.computed} computed, {report.up_to_date} up to date in {report.seconds:.1f} s"
        )
    return 0


def cmd_info(args) -> int:
    from gramlin_analyze.store.info import store_info

    _out().print(store_info(args.store, storage_options=args.storage_options))
    return 0


def cmd_validate(args) -> int:
    from gramlin_analyze.store.validate import validate_store

    notes: list[str] = []
    problems = validate_store(args.store, storage_options=args.storage_options, notes=notes)
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


class _StorageOption(argparse.Action):
    """``--storage-option KEY=VALUE``, repeatable, collected into one dict for fsspec."""

    def __call__(self, parser, namespace, value, option_string=None):
        key, sep, raw = value.partition("=")
        if not sep or not key:
            parser.error(f"{option_string} {value!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: parsed})


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action=_StorageOption,
        metavar="KEY=VALUE",
        help="fsspec option of a remote store, repeatable; VALUE is JSON when it parses as JSON "
        '(client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'), else a string',
    )


def _add_writer(p: argparse.ArgumentParser) -> None:
    """Where a writing command runs its tasks, and how it takes the store lock."""
    p.add_argument("--workers", type=int, help="run on a LocalCluster of N processes")
    p.add_argument(
        "--threads",
        type=int,
        help="tasks in parallel on the default threaded scheduler (default: twice the cores, one BLAS/torch thread each; one per core when capturing)",
    )
    p.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="remove a remote store's lock left by a dead writer",
    )


def _add_discovery(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", help="read every checkpoint with this reader (default: guess per file)"
    )
    p.add_argument(
        "--order",
        choices=("name", "mtime"),
        help="resolve step ambiguity: keep the last checkpoint of a step by name or mtime; "
        "number checkpoints by this order when none has a step",
    )
    p.add_argument(
        "--state-dict-key",
        help="key of the model state dict inside a nested .pt/.ckpt (e.g. ema.model)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="skip checkpoints modified less than SECONDS ago (a live run may still be writing them)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gramlin-analyze",
        description="Weight Gram matrices, virtual covariance and target linearity over saved training runs.",
    )
    parser.add_argument("--version", action="version", version=f"gramlin-analyze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "scan", help="list the checkpoints that ingest would read (reads no tensor bytes)"
    )
    p.add_argument("directory")
    _add_discovery(p)
    _add_common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("ingest", help="write checkpoints (weights, activations) into a store")
    p.add_argument("directory")
    p.add_argument("--store", "-o", help="store path or URL (default: DIRECTORY.zarr)")
    p.add_argument(
        "--layers", nargs="+", metavar="GLOB", help="layers to store (glob over normalized names)"
    )
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="layers to leave out")
    _add_discovery(p)
    p.add_argument(
        "--allow-torchscript-code",
        action="store_true",
        help="read TorchScript archives: they carry code that runs with the model (trusted sources only)",
    )
    cap = p.add_argument_group("capture (probe-set activations and gradients)")
    cap.add_argument(
        "--probe", help="probe set file (.npz/.safetensors/.pt) with inputs and labels or targets"
    )
    cap.add_argument(
        "--model", help="model source: pkg.module:build, path/to/file.py:build, or torchscript"
    )
    cap.add_argument(
        "--mlp-activation",
        help="rebuild a plain MLP from the weights with this activation (relu, gelu, tanh, sigmoid, silu, identity)",
    )
    cap.add_argument(
        "--loss",
        default="cross_entropy",
        help="cross_entropy | mse | bce | pkg.module:fn (default cross_entropy)",
    )
    cap.add_argument(
        "--reduction", default="mean", choices=("mean", "sum"), help="the training loss's reduction"
    )
    cap.add_argument("--batch-size", type=int, default=256, help="probe examples per forward pass")
    cap.add_argument(
        "--activations-dtype", default="float32", choices=("float32", "float16", "float64")
    )
    cap.add_argument(
        "--extra-layers",
        nargs="+",
        metavar="GLOB",
        help="capture modules other than Linear/Conv whose weight acts as h @ W.T",
    )
    cap.add_argument(
        "--pool", choices=("mean", "last"), help="pool positions/tokens into one sample per example"
    )
    cap.add_argument(
        "--capture-agop",
        action="store_true",
        help="also store each layer's AGOP of the network output",
    )
    cap.add_argument(
        "--agop-projections",
        type=int,
        default=64,
        help="random projections for AGOP with many outputs",
    )
    cap.add_argument(
        "--no-strict",
        action="store_true",
        help="load checkpoint weights into the factory model non-strictly",
    )
    cap.add_argument(
        "--lr", type=float, help="constant learning rate (wins over checkpoint metadata)"
    )
    cap.add_argument("--lr-schedule", help="file of (step, lr) pairs, CSV or JSON")
    cap.add_argument(
        "--activations",
        metavar="DIR",
        help="ingest activations computed elsewhere: step_<N>.npz files",
    )
    _add_writer(p)
    _add_storage(p)
    _add_common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("analyze", help="compute Gram, VC, TL and related metrics into /metrics")
    p.add_argument("store")
    p.add_argument(
        "--metrics",
        nargs="+",
        metavar="NAME",
        help="families (gram spectrum vc tl nfa nc cka) or single metrics; default: all the store supports",
    )
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="layers to analyze (default: all)")
    p.add_argument(
        "--recompute", action="store_true", help="recompute results whose inputs did not change"
    )
    p.add_argument(
        "--tl-lambda", type=float, default=0.0, help="ridge lambda of target linearity (default 0)"
    )
    p.add_argument(
        "--center-features", action="store_true", help="center H before the TL regression"
    )
    p.add_argument(
        "--intercept", action="store_true", help="add an intercept column to the TL regression"
    )
    _add_writer(p)
    _add_storage(p)
    _add_common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "info", help="summarize a store: steps, layers, shapes, statuses, provenance"
    )
    p.add_argument("store")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate", help="check a store against the JSON Schemas and its chunks")
    p.add_argument("store")
    _add_storage(p)
    _add_common(p)
    p.set_defaults(func=cmd_validate)
    return parser


#: Commands that run tasks: SIGINT/SIGTERM stop them between tasks (see scheduling.stop_on_signals).
_STOPPABLE = ("ingest", "analyze")


def _resume_line(argv: list[str] | None, signum: int | None) -> str:
    """The one line printed when a run is stopped: how to finish it."""
    import shlex
    import signal

    name = signal.Signals(signum).name if signum else "interrupt"
    command = shlex.join(["gramlin-analyze", *(sys.argv[1:] if argv is None else argv)])
    return f"stopped ({name}); completed steps are kept. To finish, run the same command again: {command}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` None means this process is the program (``sys.argv``)."""
    try:
        return _main(argv)
    finally:
        if argv is None:
            # The interpreter exits next, and its last garbage collection walks
            # every object the imports made: longer than a no-op command's work
            # (benchmarks/startup.py). Nothing of ours is left to finalize
            # (stores are written and locks released), so they are frozen out.
            gc.freeze()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    if args.command in _STOPPABLE:
        from gramlin_analyze.scheduling import stop_on_signals

        stopping = stop_on_signals()
    else:
        stopping = contextlib.nullcontext(None)
    try:
        with stopping as stop:
            code = int(args.func(args) or 0)
        if stop is not None and stop.signum is not None:
            _say(_resume_line(argv, stop.signum), err=True)
            return stop.exit_code
        return code
    except KeyboardInterrupt:
        _say(_resume_line(argv, None) if args.command in _STOPPABLE else "interrupted", err=True)
        return 130
    except (GramlinError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
