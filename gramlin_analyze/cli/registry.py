"""The subcommands of ``gramlin-analyze``: name, help line, and where the code lives.

A command is a module with ``add_arguments(parser)`` (its own options; the
shared ``--quiet``/``--debug`` are added after them) and ``run(args) -> int``
(the exit code). Its module is imported only when the command is named on the
command line, so ``--version`` and ``--help`` import none of them: keep such a
module's top level light and import heavy libraries inside ``run``.
"""

from __future__ import annotations

from collections import namedtuple

__all__ = ["COMMANDS", "Command", "command"]


# A named tuple rather than a dataclass: ``dataclasses`` would add ``inspect``,
# ``ast`` and ``typing`` to what ``--version`` imports.
class Command(
    namedtuple(
        "Command",
        "name module help add_arguments run stoppable",
        defaults=("add_arguments", "run", False),
    )
):
    """One subcommand (immutable).

    Attributes
    ----------
    name : str
        The word on the command line.
    module : str
        Import path of the module defining it.
    help : str
        The line ``gramlin-analyze --help`` shows for it.
    add_arguments, run : str
        Names of the module's two functions (default ``"add_arguments"``, ``"run"``).
    stoppable : bool
        The command runs tasks: SIGINT/SIGTERM stop it between tasks
        (:func:`gramlin_analyze.scheduling.stop_on_signals`) and it prints how
        to resume.
    """

    __slots__ = ()

    def function(self, attr: str):
        """The module's function ``attr``, importing the module on first use."""
        import importlib

        return getattr(importlib.import_module(self.module), attr)


#: In ``--help`` order. A new command is one more line here.
COMMANDS: tuple[Command, ...] = (
    Command(
        "scan",
        "gramlin_analyze.cli.scan",
        "list the checkpoints that ingest would read (reads no tensor bytes)",
    ),
    Command(
        "ingest",
        "gramlin_analyze.cli.ingest",
        "write checkpoints (weights, activations) into a store",
        stoppable=True,
    ),
    Command(
        "analyze",
        "gramlin_analyze.cli.analyze",
        "compute Gram, VC, TL and related metrics into /metrics",
        stoppable=True,
    ),
    Command(
        "info",
        "gramlin_analyze.cli.info",
        "summarize a store: steps, layers, shapes, statuses, provenance",
    ),
    Command(
        "validate",
        "gramlin_analyze.cli.validate",
        "check a store against the JSON Schemas and its chunks",
    ),
    Command(
        "report",
        "gramlin_analyze.report.commands",
        "write a self-contained HTML report of a store: figures, run summary, table",
        add_arguments="add_report_arguments",
        run="run_report",
    ),
    Command(
        "summary",
        "gramlin_analyze.report.commands",
        "print the per-layer table at a step; export /metrics as CSV or Parquet",
        add_arguments="add_summary_arguments",
        run="run_summary",
    ),
)


def command(name: str) -> Command:
    """The registered command called ``name``."""
    return next(c for c in COMMANDS if c.name == name)
