"""Which callables a pickle would import, found by reading its opcodes, never running them.

torch's restricted unpickler names the global it refuses only for the opcodes
of protocol 2 (``GLOBAL``); a hostile pickle of protocol 4 or 5 imports through
``STACK_GLOBAL`` behind ``FRAME`` and ``MEMOIZE`` opcodes, which it rejects as
"unsupported operand" before seeing the import, so the refusal looked like a
corrupt file. :func:`unsafe_globals` tells the two apart: it walks the opcodes
with :mod:`pickletools` (a parser, nothing is imported or called) and lists the
globals outside torch's allow-list.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from typing import IO, Any

__all__ = ["imported_globals", "unsafe_globals", "pickle_bytes"]

#: Opcodes that push a string (a module or attribute name for ``STACK_GLOBAL``).
_STRINGS = frozenset(
    {
        "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
        "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
    }
)  # fmt: skip
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_QUIET = frozenset({"FRAME", "PROTO", "MEMOIZE", *_PUTS, "STOP"})
#: A legacy torch file is five pickles in a row, then raw storage bytes.
_MAX_PICKLES = 5


def _dotted(module: Any, name: Any) -> str:
    """``module.name`` with Python 2 names mapped as the unpicklers map them."""
    if not (isinstance(module, str) and isinstance(name, str)):
        return "<a global whose name is computed at load time>"
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _one_pickle(stream: IO[bytes], found: list[str]) -> None:
    """Append the globals of the pickle at ``stream``'s position; stops after its STOP."""
    recent: list[Any] = []  # pushed values, strings kept (enough for STACK_GLOBAL)
    memo: dict[Any, Any] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(_dotted(module, attr))
        elif name == "STACK_GLOBAL":
            pair = recent[-2:] if len(recent) >= 2 else [None, None]
            found.append(_dotted(*pair))
            recent[-2:] = [None]
        elif name in _STRINGS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUTS:
            memo[arg] = recent[-1] if recent else None
        elif name in _GETS:
            recent.append(memo.get(arg))
        elif name not in _QUIET:
            recent.append(None)


def imported_globals(data: bytes) -> list[str]:
    """Every global the pickle(s) in ``data`` import, in order, up to where they end
    or stop parsing (a truncated pickle yields what came before the damage)."""
    stream = io.BytesIO(data)
    found: list[str] = []
    for _ in range(_MAX_PICKLES):
        start = stream.tell()
        try:
            _one_pickle(stream, found)
        except Exception:  # damaged or raw bytes: the globals seen so far are the answer
            break
        if stream.tell() == start or stream.tell() >= len(data):
            break
    return found


def _allowed() -> set[str]:
    """torch's allow-list for ``weights_only`` loads, including what the user (or a
    scoped ``safe_globals`` block such as Lightning's) added."""
    from torch import _weights_only_unpickler as restricted

    return set(restricted._get_allowed_globals()) | set(restricted._get_user_allowed_globals())


def unsafe_globals(data: bytes) -> list[str]:
    """The globals in ``data`` that torch's restricted unpickler would refuse, each once."""
    allowed = _allowed()
    return list(dict.fromkeys(g for g in imported_globals(data) if g not in allowed))


def pickle_bytes(source: IO[bytes], *, zipped: bool, limit: int) -> bytes:
    """The pickle of a ``torch.save`` file: ``data.pkl`` of a zip archive, else the
    head of a legacy file (at most ``limit`` bytes either way)."""
    if not zipped:
        return source.read(limit)
    with zipfile.ZipFile(source) as archive:
        member = next(
            (i for i in archive.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"), None
        )
        if member is None or member.file_size > limit:
            return b""
        with archive.open(member) as f:
            return f.read(limit)
