"""``gramlin-analyze scan``: list the checkpoints that ingest would read."""

from __future__ import annotations

import argparse
from pathlib import Path

from gramlin_analyze.cli.options import add_discovery, add_storage
from gramlin_analyze.cli.output import console, human, out
from gramlin_analyze.errors import GramlinError
from gramlin_analyze.io.remote import is_url

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="run directory, or an fsspec URL such as s3://bucket/run")
    add_discovery(p)
    add_storage(p)


def _relative(path, directory) -> str:
    """``path`` relative to the scanned directory (named in the table title) when under it."""
    if is_url(directory):
        prefix = str(directory).rstrip("/") + "/"
        return str(path).removeprefix(prefix)
    p, d = Path(path), Path(directory)
    try:
        return str(p.resolve().relative_to(d.resolve())) if d.is_dir() else str(p)
    except ValueError:
        return str(p)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from gramlin_analyze.io.discovery import scan
    from gramlin_analyze.io.registry import reader_for

    opts: dict | None = {"state_dict_key": args.state_dict_key} if args.state_dict_key else None
    if args.storage_options:
        opts = {**(opts or {}), "storage_options": args.storage_options}
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
            console(args.quiet).print(f"[red]error:[/red] {err}")
        table.add_row(
            str(s.step),
            s.format,
            str(len(s.files)),
            human(s.bytes),
            n,
            _relative(s.path, args.directory),
        )
    out().print(table)
    for path, why in getattr(sources, "skipped", []):
        console(args.quiet).print(f"skipped {path}: {why}")
    return 1 if failed else 0
