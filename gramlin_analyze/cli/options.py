"""Options shared by several commands, added to a command's parser by its ``add_arguments``."""

from __future__ import annotations

import argparse

__all__ = ["StorageOption", "add_common", "add_discovery", "add_storage", "add_writer"]


def add_common(p: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--debug``: every command gets them, after its own options."""
    p.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


class StorageOption(argparse.Action):
    """``--storage-option KEY=VALUE``, repeatable, collected into one dict for fsspec."""

    def __call__(self, parser, namespace, value, option_string=None):
        import json

        key, sep, raw = value.partition("=")
        if not sep or not key:
            parser.error(f"{option_string} {value!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: parsed})


def add_storage(p: argparse.ArgumentParser) -> None:
    """``--storage-option``, for the commands that open a store."""
    p.add_argument(
        "--storage-option",
        dest="storage_options",
        action=StorageOption,
        metavar="KEY=VALUE",
        help="fsspec option of a remote store, repeatable; VALUE is JSON when it parses as JSON "
        '(client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'), else a string',
    )


def add_writer(p: argparse.ArgumentParser) -> None:
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


def add_discovery(p: argparse.ArgumentParser) -> None:
    """How checkpoints are found in a directory (``scan`` and ``ingest``)."""
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
