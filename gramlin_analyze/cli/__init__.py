"""The ``gramlin-analyze`` command line.

Exit codes: 0 ok, 1 some inputs failed (the rest landed), 2 bad usage or a
store/lock problem, 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM: ``ingest``
and ``analyze`` then start no new task, record the ones running, and print the
command that finishes the run. One line per error; ``--debug`` shows tracebacks.

Heavy libraries are imported by the commands that need them, so ``--help``
and a run with nothing to do start in a fraction of a second.

Layout: :mod:`~gramlin_analyze.cli.app` (parser, ``main``, exit codes),
:mod:`~gramlin_analyze.cli.registry` (the list of commands),
:mod:`~gramlin_analyze.cli.options` (options shared by commands),
:mod:`~gramlin_analyze.cli.output` (printing), and one module per command.
A new command is a module with ``add_arguments(parser)`` and
``run(args) -> int`` plus one :class:`~gramlin_analyze.cli.registry.Command`
line in ``registry.COMMANDS``.
"""

from gramlin_analyze.cli.app import build_parser, main

__all__ = ["main", "build_parser"]
