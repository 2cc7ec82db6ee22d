"""The command registry: a command is one module plus one line in ``registry.COMMANDS``.

Its module is imported when the command is named, not for ``--help``; the
shared ``--quiet``/``--debug`` come after its own options; ``main`` turns its
result and its errors into exit codes as for the built-in commands.
"""

from __future__ import annotations

import argparse
import re
import sys

import pytest

from gramlin_analyze.cli import build_parser, main, registry
from gramlin_analyze.cli.registry import Command

HELLO = """
import argparse

from gramlin_analyze.errors import UsageError


def add_hello_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--times", type=int, default=1)


def run_hello(args: argparse.Namespace) -> int:
    if args.name == "nobody":
        raise UsageError("say hello to somebody")
    if not args.quiet:
        print(" ".join(["hello", args.name] * args.times))
    return 3 if args.debug else 0
"""


@pytest.fixture
def hello(tmp_path, monkeypatch):
    """A command ``hello`` registered from a module of its own, not yet imported."""
    module = f"gramlin_hello_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(HELLO)
    monkeypatch.syspath_prepend(str(tmp_path))
    cmd = Command("hello", module, "greet", add_arguments="add_hello_arguments", run="run_hello")
    monkeypatch.setattr(registry, "COMMANDS", (*registry.COMMANDS, cmd))
    yield module
    sys.modules.pop(module, None)


def test_help_lists_the_commands_in_registry_order(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.findall(r"^    (\S+)", capsys.readouterr().out, flags=re.M)
    assert listed == [c.name for c in registry.COMMANDS]


def test_a_command_is_defined_when_named_with_the_common_options_last():
    parser = build_parser()
    args = parser.parse_args(["info", "s.zarr", "-q", "--storage-option", "anon=true"])
    assert (args.command, args.store, args.quiet, args.debug) == ("info", "s.zarr", True, False)
    assert args.storage_options == {"anon": True}
    assert args.func is sys.modules["gramlin_analyze.cli.info"].run
    info = parser._subparsers._group_actions[0].choices["info"]
    assert [a.dest for a in info._actions][-2:] == ["quiet", "debug"]
    # the same parser parses again without defining the options twice
    assert parser.parse_args(["info", "t.zarr", "--debug"]).debug


def test_a_registered_command_runs_and_its_exit_code_and_errors_come_back(hello, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "greet" in capsys.readouterr().out
    assert hello not in sys.modules, "--help imported a command's module"

    assert main(["hello", "world", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hello world hello world\n"
    assert hello in sys.modules
    assert main(["hello", "world", "-q", "--debug"]) == 3
    assert capsys.readouterr().out == ""
    assert main(["hello", "nobody"]) == 2
    assert capsys.readouterr().err == "error: say hello to somebody\n"
    with pytest.raises(SystemExit) as exit_:
        main(["hello"])
    assert exit_.value.code == 2
    usage = " ".join(capsys.readouterr().err.split())  # however the terminal wraps it
    assert "usage: gramlin-analyze hello [-h] [--times TIMES] [--quiet] [--debug] name" in usage


def test_a_command_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(registry, "COMMANDS", (*registry.COMMANDS, registry.command("info")))
    with pytest.raises(argparse.ArgumentError, match="conflicting subparser"):
        build_parser()
