"""``gramlin-analyze analyze``: compute Gram, VC, TL and related metrics into /metrics."""

from __future__ import annotations

import argparse

from gramlin_analyze.cli.options import add_storage, add_writer, writer_scheduler
from gramlin_analyze.cli.output import ProgressBar, console, say

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--tl-pca",
        type=int,
        default=0,
        metavar="K",
        help="project TL's H and the surrogate's Z onto K principal axes when wider than "
        "--tl-pca-above (the paper's code: 256; default 0: off, as MATH.md)",
    )
    p.add_argument(
        "--tl-pca-above",
        type=int,
        default=1000,
        metavar="WIDTH",
        help="width above which --tl-pca applies (default 1000, the paper's)",
    )
    p.add_argument(
        "--conv-samples",
        choices=("image", "position", "mean"),
        default="position",
        help="TL/NC samples of conv and token layers with one label per example: image = an "
        "example's positions flattened into one sample (the paper's code), position = one "
        "per (example, position) (default, as MATH.md), mean = mean over positions",
    )
    add_writer(p)
    add_storage(p)


def run(args: argparse.Namespace) -> int:
    with writer_scheduler(args) as scheduler:
        if args.cluster and scheduler is None:  # stopped while its workers came up
            return 0
        report = _analyze(args, scheduler)
    _print_report(args, report)
    return 0


def _analyze(args: argparse.Namespace, scheduler: str | None):
    """Run the analysis the options describe, with a progress bar, on ``scheduler`` if given."""
    from gramlin_analyze.analysis import analyze

    with ProgressBar(args.quiet, "analyze") as bar:
        return analyze(
            args.store,
            metrics=args.metrics,
            layers=args.layers,
            recompute=args.recompute,
            tl_lambda=args.tl_lambda,
            center_features=args.center_features,
            intercept=args.intercept,
            tl_pca=args.tl_pca,
            tl_pca_above=args.tl_pca_above,
            conv_samples=args.conv_samples,
            workers=args.workers,
            threads=args.threads,
            threads_per_task=args.threads_per_task,
            scheduler=scheduler,
            storage_options=args.storage_options,
            break_lock=args.break_lock,
            progress=bar,
        )


def _print_report(args: argparse.Namespace, report) -> None:
    """What was skipped or not computed (stderr), warnings, then the one summary line."""
    if not args.quiet:
        for fam, names in report.partial.items():
            say(f"{fam}: skipped for layers {', '.join(names)} (their data is missing)", err=True)
        for step, status in sorted(report.skipped_steps.items()):
            say(f"skipped step {step}: status {status} (not read)", err=True)
        for fam, why in report.unavailable.items():
            say(f"not computed: {fam}: {why}", err=True)
    if report.warnings:  # rich only when there is something to say: a no-op run stays light
        from rich.markup import escape  # (warnings are plain text: brackets are not markup)

        for line in report.warnings:
            console(args.quiet).print(f"[yellow]warning:[/yellow] {escape(line)}", soft_wrap=True)
    for step, layer in report.nonfinite:
        console(args.quiet).print(
            f"[yellow]warning:[/yellow] step {step}, layer {layer}: NaN/Inf inputs, results are NaN"
        )
    if not args.quiet:
        say(
            f"{report.store}: {', '.join(report.families) or 'nothing'} -> /metrics: "
            f"{report.computed} computed, {report.up_to_date} up to date in {report.seconds:.1f} s"
        )
