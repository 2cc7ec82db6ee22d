"""``gramlin-analyze info``: summarize a store."""

from __future__ import annotations

import argparse

from gramlin_analyze.cli.options import add_storage
from gramlin_analyze.cli.output import out

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store")
    add_storage(p)


def run(args: argparse.Namespace) -> int:
    from gramlin_analyze.store.info import store_info

    # plain text: layer names and optimizer settings may hold brackets, which are not markup
    out().print(store_info(args.store, storage_options=args.storage_options), markup=False)
    return 0
