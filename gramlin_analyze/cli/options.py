"""Options shared by several commands, added to a command's parser by its ``add_arguments``."""

from __future__ import annotations

import argparse
import contextlib

__all__ = [
    "StorageOption",
    "add_common",
    "add_discovery",
    "add_storage",
    "add_writer",
    "writer_scheduler",
]

#: ``--cluster`` kinds (gramlin_analyze.cluster.KINDS, not imported for ``--help``)
CLUSTER_KINDS = ("slurm", "pbs", "sge", "lsf", "local")


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
        help="fsspec option of a remote store and of checkpoints or a probe behind a URL "
        "(the same options serve both), repeatable; VALUE is JSON when it parses as JSON "
        '(client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'), else a string',
    )


def add_writer(p: argparse.ArgumentParser) -> None:
    """Where a writing command runs its tasks, and how it takes the store lock."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="run on a LocalCluster of N processes")
    p.add_argument(
        "--threads",
        type=int,
        help="tasks in parallel on the default threaded scheduler (default: twice the cores, one BLAS/torch thread each; one per core when capturing)",
    )
    p.add_argument(
        "--threads-per-task",
        type=_positive(int),
        metavar="N",
        help="BLAS/torch threads of each task (default: the cores of the machine it runs on "
        "over the tasks running there at once, at least one)",
    )
    where.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="remove a remote store's lock left by a dead writer",
    )
    _add_cluster(p, where)


def _positive(kind):
    """An argparse type: ``kind`` of the text, above zero."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_cluster(p: argparse.ArgumentParser, where: argparse._MutuallyExclusiveGroup) -> None:
    """``--cluster KIND`` and its ``--jobs``, ``--cluster-option``, ``--cluster-timeout``."""
    where.add_argument(
        "--cluster",
        choices=CLUSTER_KINDS,
        help="start a cluster for this command and shut it down after: a batch system's jobs "
        "(dask-jobqueue; settings from dask's jobqueue.KIND.* config) or local processes",
    )
    p.add_argument(
        "--jobs",
        type=_positive(int),
        metavar="N",
        help="with --cluster: jobs to submit (local: worker processes; default 1, local: one per core)",
    )
    p.add_argument(
        "--cluster-option",
        dest="cluster_options",
        action=StorageOption,
        metavar="KEY=VALUE",
        help="with --cluster: a dask-jobqueue setting over the config's, repeatable, VALUE as JSON "
        "when it parses (cores=8 memory=32GB walltime=01:00:00 account=abc)",
    )
    p.add_argument(
        "--cluster-timeout",
        type=_positive(float),
        default=300.0,
        metavar="SECONDS",
        help="with --cluster: how long to wait for the workers (default 300)",
    )


@contextlib.contextmanager
def writer_scheduler(args: argparse.Namespace):
    """The scheduler address the command runs on: ``--scheduler``'s, or that of the
    cluster ``--cluster`` starts here (shut down when the block ends), or None.

    With ``--cluster``, None means a stop was asked for while its workers came up:
    the caller runs nothing.
    """
    if args.cluster is None:
        if args.jobs is not None or args.cluster_options:
            from gramlin_analyze.errors import UsageError

            raise UsageError(
                "--jobs and --cluster-option go with --cluster slurm|pbs|sge|lsf|local"
            )
        yield args.scheduler
        return
    from gramlin_analyze.cluster import ClusterRequest, cluster_address
    from gramlin_analyze.scheduling import stop_requested

    request = ClusterRequest(
        args.cluster, args.jobs, dict(args.cluster_options or {}), args.cluster_timeout
    )
    with cluster_address(request, stop_requested=stop_requested, quiet=args.quiet) as address:
        yield address


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
