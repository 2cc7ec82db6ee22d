"""``gramlin-analyze validate``: check a store against the JSON Schemas and its chunks."""

from __future__ import annotations

import argparse

from gramlin_analyze.cli.options import add_storage
from gramlin_analyze.cli.output import console, out

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store")
    add_storage(p)


def run(args: argparse.Namespace) -> int:
    from gramlin_analyze.store.validate import validate_store

    notes: list[str] = []
    problems = validate_store(args.store, storage_options=args.storage_options, notes=notes)
    for n in notes:
        console(args.quiet).print(f"note: {n}", soft_wrap=True, markup=False)
    if problems:
        err = console()
        for p in problems:
            err.print(f"[red]invalid:[/red] {p}", soft_wrap=True)
        return 1
    if not args.quiet:
        out().print(f"{args.store}: valid")
    return 0
