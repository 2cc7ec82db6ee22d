"""``gramlin-analyze report`` and ``gramlin-analyze summary``: their options and runners.

The CLI's registry names these functions; the module's top level imports
nothing heavy (matplotlib, xarray and pandas are imported by the runners).
Anticipated errors are raised as :class:`~gramlin_analyze.errors.GramlinError`,
which the CLI prints as one line naming the store and what to do (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gramlin_analyze.cli.options import add_storage
from gramlin_analyze.cli.output import say

__all__ = ["add_report_arguments", "run_report", "add_summary_arguments", "run_summary"]

_FORMATS = ("csv", "parquet")


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "stores",
        nargs="+",
        metavar="STORE",
        help="a store written by ingest and analyze (path or fsspec URL); several stores "
        "or a glob ('sweep/*.zarr') write one comparison report of their runs",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="HTML",
        help="the report (default: <store name>.report.html beside the store; "
        "runs.report.html beside the first of several)",
    )
    p.add_argument("--png", metavar="DIR", help="also write each figure as DIR/<figure>.png")
    p.add_argument("--svg", action="store_true", help="with --png: also DIR/<figure>.svg")
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="only these layers: names (in this order) or globs such as 'encoder.layer.1*'",
    )
    _add_comparison_arguments(p)
    add_storage(p)


def _add_comparison_arguments(p: argparse.ArgumentParser) -> None:
    runs = p.add_argument_group("comparing several stores")
    runs.add_argument(
        "--by",
        metavar="ATTR",
        help="the run attribute the final TL and the TL gap are drawn against (default: "
        "the one attribute besides seed that differs between the runs)",
    )
    runs.add_argument(
        "--gap",
        nargs=2,
        metavar=("FIRST", "SECOND"),
        help="the two layers of the TL gap TL(SECOND) - TL(FIRST) (default: first and last)",
    )
    runs.add_argument(
        "--align",
        choices=("step", "epoch", "tokens"),
        default="step",
        help="align the runs by step (default), or by the epochs or tokens seen of their /steps",
    )


def run_report(args: argparse.Namespace) -> int:
    from gramlin_analyze.errors import UsageError
    from gramlin_analyze.runs import expand_stores

    stores = expand_stores(args.stores, storage_options=args.storage_options)
    if len(stores) > 1:
        from gramlin_analyze.report.compare import build_comparison_report

        result = build_comparison_report(
            stores,
            args.output,
            by=args.by,
            gap=args.gap,
            align=args.align,
            png_dir=args.png,
            svg=args.svg,
            layers=args.layers,
            storage_options=args.storage_options,
        )
    else:
        if args.by or args.gap or args.align != "step":
            raise UsageError("--by, --gap and --align compare runs: give several stores")
        from gramlin_analyze.report.build import build_report

        result = build_report(
            stores[0],
            args.output,
            png_dir=args.png,
            svg=args.svg,
            layers=args.layers,
            storage_options=args.storage_options,
        )
    if not args.quiet:
        for line in result.warnings:
            say(f"warning: {line}", err=True)
        for line in result.missing:
            say(f"not drawn: {line}", err=True)
        if result.files:
            say(f"figures: {len(result.files)} files in {Path(args.png)}", err=True)
    say(str(result.html))
    return 0


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores (paths or fsspec URLs)")
    p.add_argument(
        "--step",
        default="last",
        metavar="N|first|last",
        help="the step of the table (default: last ok)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="only these layers: names (in this order) or globs such as 'encoder.layer.1*'",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="also write every /metrics scalar, one row per (step, layer), to FILE (tidy)",
    )
    p.add_argument(
        "--format",
        choices=_FORMATS,
        help="format of the --csv export (default: parquet for a .parquet FILE, else csv)",
    )
    add_storage(p)


def run_summary(args: argparse.Namespace) -> int:
    from gramlin_analyze.runs import expand_stores

    _check_export(args)
    args.stores = expand_stores(args.stores, storage_options=args.storage_options)
    if len(args.stores) == 1:
        table = _one_summary(args, args.stores[0])
    else:
        table = _runs_summary(args)
    if args.csv:
        _export(args)
    if args.json:
        import json

        say(json.dumps(table, indent=1, allow_nan=False))
    else:
        say(table)
    if args.csv and not args.quiet:
        say(f"wrote {args.csv}", err=True)
    return 0


def _check_export(args: argparse.Namespace) -> None:
    from gramlin_analyze.errors import UsageError

    if args.format and not args.csv:
        raise UsageError("--format chooses the format of the --csv export: give --csv FILE too")
    if args.format == "parquet" or (args.csv and str(args.csv).endswith(".parquet")):
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            from gramlin_analyze.errors import MissingDependencyError

            raise MissingDependencyError(
                f"{args.csv}: Parquet needs pyarrow: pip install pyarrow (or write CSV)"
            )


def _one_summary(args: argparse.Namespace, store: str):
    from gramlin_analyze.errors import UsageError
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.summary import format_table, summary_frame, table_records

    src = load(store, layers=args.layers, storage_options=args.storage_options)
    _require_metrics(src, store)
    try:
        df = summary_frame(src, step=args.step)
    except UsageError as err:
        raise UsageError(f"{store}: {err}") from err
    if args.json:
        return {
            "store": store,
            "step": df.attrs["step"],
            "columns": df.attrs["meanings"],
            "layers": table_records(df),
        }
    legend = "; ".join(f"{k}: {v}" for k, v in df.attrs["meanings"].items())
    return f"{store}: step {df.attrs['step']}\n\n{format_table(df)}\n\n{legend}"


def _runs_summary(args: argparse.Namespace):
    """One table of several stores' runs (a ``run`` column), each at its own step."""
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.runs_table import (
        format_runs_table,
        runs_records,
        runs_summary_frame,
    )

    sources = []
    for store in args.stores:
        sources.append(load(store, layers=args.layers, storage_options=args.storage_options))
        _require_metrics(sources[-1], store)
    names = _names(sources, args.stores)
    df = runs_summary_frame(sources, names, step=args.step, stores=args.stores)
    if args.json:
        return {
            "stores": dict(zip(names, args.stores, strict=True)),
            "columns": df.attrs["meanings"],
            "rows": runs_records(df),
        }
    legend = "; ".join(f"{k}: {v}" for k, v in df.attrs["meanings"].items())
    head = ", ".join(f"{n}: {s}" for n, s in zip(names, args.stores, strict=True))
    return f"runs {head}\n\n{format_runs_table(df)}\n\n{legend}"


def _names(sources, stores) -> list[str]:
    from gramlin_analyze.runs import run_names

    return run_names([src.attrs for src in sources], stores)


def _require_metrics(src, store: str) -> None:
    from gramlin_analyze.errors import MissingDataError

    if not src.metrics.data_vars:
        raise MissingDataError(f"{store}: no /metrics yet; run gramlin-analyze analyze {store}")


def _export(args: argparse.Namespace) -> None:
    import pandas as pd

    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.summary import tidy_frame

    sources = []
    for store in args.stores:
        sources.append(
            load(store, layers=args.layers, storage_options=args.storage_options, ok_only=False)
        )
        _require_metrics(sources[-1], store)
    frames = []
    for src, store, name in zip(sources, args.stores, _names(sources, args.stores), strict=True):
        df = tidy_frame(src)
        if len(args.stores) > 1:
            df.insert(0, "run", name)
            df.insert(1, "store", store)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    fmt = args.format or ("parquet" if str(args.csv).endswith(".parquet") else "csv")
    if fmt == "parquet":
        df.to_parquet(args.csv, index=False)
    else:
        df.to_csv(args.csv, index=False, float_format="%.17g")
