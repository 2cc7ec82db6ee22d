"""``gramlin-analyze ingest``: write checkpoints (weights, activations) into a store."""

from __future__ import annotations

import argparse

from gramlin_analyze.cli.options import add_discovery, add_storage, add_writer, writer_scheduler
from gramlin_analyze.cli.output import ProgressBar, console, say
from gramlin_analyze.errors import UsageError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory")
    p.add_argument("--store", "-o", help="store path or URL (default: DIRECTORY.zarr)")
    p.add_argument(
        "--layers", nargs="+", metavar="GLOB", help="layers to store (glob over normalized names)"
    )
    p.add_argument("--exclude", nargs="+", metavar="GLOB", help="layers to leave out")
    add_discovery(p)
    p.add_argument(
        "--allow-torchscript-code",
        action="store_true",
        help="read TorchScript archives: they carry code that runs with the model (trusted sources only)",
    )
    cap = p.add_argument_group("capture (probe-set activations and gradients)")
    _add_capture_model(cap)
    _add_capture_recording(cap)
    _add_capture_sources(cap)
    _add_run_metadata(p)
    _add_watch(p)
    add_writer(p)
    add_storage(p)


def _add_run_metadata(p: argparse.ArgumentParser) -> None:
    """The run's name and attributes, stored for comparing runs (``ga.open_runs``)."""
    run = p.add_argument_group("run metadata (compare runs: report A.zarr B.zarr, ga.open_runs)")
    run.add_argument("--run-name", help="the run's name (default: the checkpoint directory's)")
    run.add_argument(
        "--run-attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run attribute, repeatable (label_noise=0.5, seed=3, optimizer=sgd); numbers stay "
        "numbers, true/false are flags",
    )
    run.add_argument(
        "--replace-run-attrs",
        action="store_true",
        help="replace the store's run attributes with the ones given (else another value is refused)",
    )


def _add_capture_model(cap: argparse._ArgumentGroup) -> None:
    """The probe set, the model that runs it, and the loss it is trained with."""
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


def _add_capture_recording(cap: argparse._ArgumentGroup) -> None:
    """How capture runs and what it records."""
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
        "--device",
        default="cpu",
        metavar="cpu|cuda|cuda:N",
        help="run capture on this device of each worker (default cpu; cuda needs a GPU on every "
        "worker); the stored arrays are the same either way, to float tolerance",
    )
    cap.add_argument(
        "--no-strict",
        action="store_true",
        help="load checkpoint weights into the factory model non-strictly",
    )


def _add_capture_sources(cap: argparse._ArgumentGroup) -> None:
    """The learning rate, and activations computed elsewhere instead of captured."""
    cap.add_argument(
        "--lr", type=float, help="constant learning rate (wins over checkpoint metadata)"
    )
    cap.add_argument("--lr-schedule", help="file of (step, lr) pairs, CSV or JSON")
    cap.add_argument(
        "--activations",
        metavar="DIR",
        help="ingest activations computed elsewhere: step_<N>.npz files",
    )


def run(args: argparse.Namespace) -> int:
    from gramlin_analyze.store.provenance import parse_run_attrs

    _check_watch_options(args)
    capture = _capture_config(args)
    parse_run_attrs(args.run_attr)  # a malformed --run-attr is refused before any work
    with writer_scheduler(args) as scheduler:
        if args.cluster and scheduler is None:  # stopped while its workers came up
            return 0
        report = _ingest(args, capture, scheduler)
    if not args.quiet:
        (_print_watch if args.watch else _print_report)(report)
    return report.exit_code


def _ingest(args: argparse.Namespace, capture, scheduler: str | None):
    """Run the ingest the options describe, with a progress bar, on ``scheduler`` if given."""
    from gramlin_analyze.ingest import ingest
    from gramlin_analyze.store.provenance import parse_run_attrs

    if args.watch:  # the same options, pass after pass as checkpoints complete
        ingest = _watcher(args)

    def on_error(msg: str) -> None:
        console().print(f"[red]error:[/red] {msg}", soft_wrap=True)

    with ProgressBar(args.quiet, "ingest") as bar:
        return ingest(
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
            threads_per_task=args.threads_per_task,
            device=args.device,
            scheduler=scheduler,
            storage_options=args.storage_options,
            break_lock=args.break_lock,
            progress=bar,
            on_error=on_error,
            run_name=args.run_name,
            run_attrs=parse_run_attrs(args.run_attr),
            replace_run_attrs=args.replace_run_attrs,
        )


def _capture_config(args: argparse.Namespace):
    """The capture options as a ``CaptureConfig``, None without a model; usage errors first."""
    if not (args.model or args.mlp_activation):
        if args.probe and not args.activations:
            raise UsageError(
                "--probe needs a model to capture with: --model pkg.module:build | file.py:build | torchscript, "
                "or --mlp-activation relu|gelu|tanh|… for plain MLP state dicts (or --activations DIR)"
            )
        return None
    from gramlin_analyze.capture.config import CaptureConfig

    # Without --probe, the store's probe (the plan refuses a store that holds none).
    return CaptureConfig(
        probe=args.probe or "",
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


def _print_report(report) -> None:
    """The summary line, then what the scan skipped and the steps stored with NaN/Inf."""
    n_new = len(report.ingested)
    msg = (
        f"{report.store}: {n_new} checkpoint(s) ingested, {len(report.skipped)} unchanged, "
        f"{len(report.failed)} failed in {report.seconds:.1f} s"
    )
    if report.seconds > 0 and report.bytes_read:
        msg += f" ({report.bytes_read / report.seconds / 1e6:.0f} MB/s)"
    say(msg)
    for path, why in report.scan_skipped:
        say(f"skipped {path}: {why}", err=True)
    for step, n in sorted(report.nonfinite.items()):
        console().print(
            f"[yellow]warning:[/yellow] step {step}: {n} NaN/Inf values stored and flagged (/steps.nonfinite)"
        )


def _add_watch(p: argparse.ArgumentParser) -> None:
    """``--watch`` a live training directory, and what to do after each new checkpoint."""
    w = p.add_argument_group("live runs (--watch; docs/watch.md)")
    w.add_argument(
        "--watch",
        action="store_true",
        help="keep ingesting each checkpoint once it is complete, until Ctrl-C, --until-idle or "
        "--pid; complete: the framework's own signal, else files unmodified for --settle "
        "seconds (default 1 with --watch) that parse",
    )
    w.add_argument("--analyze", action="store_true", help="analyze the new steps after each ingest")
    w.add_argument("--report", metavar="FILE", help="rewrite this HTML report after each ingest")
    w.add_argument(
        "--until-idle",
        type=float,
        metavar="SECONDS",
        help="stop once nothing in the directory changed for SECONDS",
    )
    w.add_argument(
        "--pid",
        type=int,
        help="stop when this process (the training) exits, after ingesting every checkpoint",
    )
    w.add_argument(
        "--poll",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="look for new checkpoints this often (default 0.25; file-system events wake the "
        "watcher sooner when watchdog is installed)",
    )


def _check_watch_options(args: argparse.Namespace) -> None:
    """The watch's options need ``--watch``: refused before any work."""
    given = [
        flag
        for flag, value in (
            ("--analyze", args.analyze),
            ("--report", args.report),
            ("--until-idle", args.until_idle),
            ("--pid", args.pid),
        )
        if value
    ]
    if given and not args.watch:
        raise UsageError(
            f"{', '.join(given)} act after each checkpoint of a live run: add --watch "
            "(or run gramlin-analyze analyze/report STORE after this ingest)"
        )


def _watcher(args: argparse.Namespace):
    """``ingest``'s stand-in under ``--watch``: its options go to ``watch`` with the watch's own."""
    from gramlin_analyze.ingest.watch import DEFAULT_SETTLE, watch

    def on_pass(p) -> None:
        if args.quiet:
            return
        what = f"steps {', '.join(map(str, p.ingested))}" if p.ingested else "no new step"
        line = f"watch pass {p.number}: {what} ingested ({p.ingest_seconds:.2f} s)"
        if args.analyze:
            line += f"; {p.analyzed} result(s) analyzed ({p.analyze_seconds:.2f} s)"
        if p.report is not None:
            line += f"; report {p.report}"
        say(line)

    def run_watch(directory, store, *, settle_seconds, progress, **options):
        return watch(
            directory,
            store,
            settle_seconds=settle_seconds or DEFAULT_SETTLE,
            analyze=args.analyze,
            report=args.report,
            until_idle=args.until_idle,
            pid=args.pid,
            poll_seconds=args.poll,
            on_pass=on_pass,
            **options,
        )

    return run_watch


def _print_watch(report) -> None:
    """Why the watch stopped and what it did, in one line."""
    why = {"idle": "idle", "pid": "the training process exited", "signal": "a signal"}
    say(
        f"{report.store}: watched until {why.get(report.stopped_by, report.stopped_by)}: "
        f"{len(report.ingested)} checkpoint(s) ingested in {len(report.passes)} pass(es), "
        f"{len(report.failed)} failed"
    )
