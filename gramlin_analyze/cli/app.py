"""The parser and the program: parse, run the command, turn errors and signals into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import traceback
import warnings

from gramlin_analyze._version import __version__
from gramlin_analyze.cli import registry
from gramlin_analyze.cli.options import add_common
from gramlin_analyze.cli.output import say
from gramlin_analyze.errors import GramlinError

__all__ = ["build_parser", "main"]


class _Commands(argparse._SubParsersAction):
    """Subparsers whose arguments are defined when their command is chosen.

    ``--help`` lists the commands from their help lines, so it imports no
    command module; ``COMMAND ...`` imports that command's module alone.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.defined: set[str] = set()

    def define(self, name: str) -> argparse.ArgumentParser:
        """Define command ``name``'s arguments and ``func`` on its parser (once); return the parser."""
        parser = self.choices[name]
        if name not in self.defined:
            cmd = registry.command(name)
            cmd.function(cmd.add_arguments)(parser)
            add_common(parser)
            parser.set_defaults(func=cmd.function(cmd.run))
            self.defined.add(name)
        return parser

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] in self.choices:
            self.define(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    """The ``gramlin-analyze`` parser; a command's options are defined when it is parsed."""
    parser = argparse.ArgumentParser(
        prog="gramlin-analyze",
        description="Weight Gram matrices, virtual covariance and target linearity over saved training runs.",
    )
    parser.add_argument("--version", action="version", version=f"gramlin-analyze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands)
    for cmd in registry.COMMANDS:
        sub.add_parser(cmd.name, help=cmd.help)
    return parser


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


def _orphaned_connection_errors(record) -> bool:
    """asyncio's "Task exception was never retrieved" of a lost endpoint is dropped:
    the command says what happened in one line (the store's faults module decides)."""
    if not record.exc_info:
        return True
    from gramlin_analyze.store.faults import OrphanedConnectionErrors

    return OrphanedConnectionErrors().filter(record)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cmd = registry.command(args.command)
    debug = args.debug
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        import logging

        logging.getLogger("asyncio").addFilter(_orphaned_connection_errors)
    if cmd.stoppable:
        from gramlin_analyze.scheduling import stop_on_signals

        stopping = stop_on_signals()
    else:
        stopping = contextlib.nullcontext(None)
    try:
        with stopping as stop:
            code = int(args.func(args) or 0)
        if stop is not None and stop.signum is not None:
            say(_resume_line(argv, stop.signum), err=True)
            return stop.exit_code
        return code
    except KeyboardInterrupt:
        say(_resume_line(argv, None) if cmd.stoppable else "interrupted", err=True)
        return 130
    except (GramlinError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
