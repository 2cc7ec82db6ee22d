"""A run's hyper-parameters, as its checkpoints state them, read without running any code.

Sources, from the run's last checkpoint (hyper-parameters belong to the run, not a step):
Hugging Face ``config.json`` (the model's, keys prefixed ``model.``), ``trainer_state.json``
(batch size, epochs, max steps, save and log intervals), ``training_args.bin`` (a pickled
``TrainingArguments``), Lightning's ``hyper_parameters`` in a ``.ckpt``, and orbax's
``custom_metadata``. The two pickles are read by :func:`safe_unpickle`, a stack machine
over :mod:`pickletools`' opcodes that builds only plain values: it imports nothing and
calls nothing, so a hostile file can at worst yield odd values. Only numbers, flags,
text and short lists of them are kept; keys naming a token, secret or password are
dropped, so credentials never reach a store.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import posixpath
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zipfile import BadZipFile

from gramlin_analyze.io.pickle_scan import pickle_bytes

__all__ = ["RunMetadata", "flatten_plain", "read_run_metadata", "safe_unpickle"]

#: The largest pickle read for its hyper-parameters (a Lightning ``data.pkl`` also
#: lists every tensor of the state dict; a few MB for large models).
PICKLE_LIMIT = 64 << 20
#: ``trainer_state.json`` fields that describe the run (the rest is per step).
TRAINER_STATE_KEYS = (
    "train_batch_size",
    "num_train_epochs",
    "max_steps",
    "logging_steps",
    "eval_steps",
    "save_steps",
)
#: Fields of a pickled ``TrainingArguments`` about the process, not the run.
_RUNTIME = frozenset({"distributed_state", "local_rank"})
_SECRET = re.compile(r"token|secret|passw|api_?key|credential", re.IGNORECASE)
_MAX_LIST = 16
_MAX_DEPTH = 6
_PRIMITIVE = (str, int, float, bool)


@dataclass
class RunMetadata:
    """Hyper-parameters found in a run's checkpoints, the files they came from, and notes
    on files that could not be read (they never fail an ingest)."""

    hyperparameters: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Mark:
    """``MARK`` on the stack."""


@dataclass(eq=False)
class _Object:
    """What ``REDUCE``/``NEWOBJ``/``INST`` would have built: the callable's dotted
    name, its arguments, and what ``BUILD``/``SETITEM``/``APPEND`` later gave it."""

    name: str
    args: tuple = ()
    state: Any = None
    items: dict = field(default_factory=dict)
    elements: list = field(default_factory=list)


_MARK = _Mark()
_NEW = {"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}
_QUIET = {"PROTO", "FRAME", "STOP"}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _to_mark(stack: list) -> list:
    """Pop and return the items above the topmost mark (the mark goes too)."""
    i = len(stack) - 1 - next(k for k, v in enumerate(reversed(stack)) if v is _MARK)
    items = stack[i + 1 :]
    del stack[i:]
    return items


def _set_items(target: Any, pairs: list) -> None:
    box = target.items if isinstance(target, _Object) else target
    if isinstance(box, dict):
        for k, v in zip(pairs[::2], pairs[1::2], strict=True):
            if isinstance(k, str | int | float | bool | tuple | None):
                box[k] = v


def _append(target: Any, items: list) -> None:
    box = target.elements if isinstance(target, _Object) else target
    if isinstance(box, list):
        box.extend(items)
    elif isinstance(box, set):
        box.update(i for i in items if isinstance(i, str | int | float | bool))


def _construct(name: str, stack: list) -> bool:
    """Opcodes that build objects, containers and globals; False for one not handled here."""
    if name == "STACK_GLOBAL":
        attr, module = stack.pop(), stack.pop()
        stack.append(_Object(f"{module}.{attr}"))
    elif name in ("REDUCE", "NEWOBJ"):
        args, func = stack.pop(), stack.pop()
        stack.append(_Object(getattr(func, "name", "?"), args if isinstance(args, tuple) else ()))
    elif name == "NEWOBJ_EX":
        _kwargs, args, cls = stack.pop(), stack.pop(), stack.pop()
        stack.append(_Object(getattr(cls, "name", "?"), args if isinstance(args, tuple) else ()))
    elif name == "OBJ":
        cls, *args = _to_mark(stack)
        stack.append(_Object(getattr(cls, "name", "?"), tuple(args)))
    elif name == "BUILD":
        state = stack.pop()
        if isinstance(stack[-1], _Object):
            stack[-1].state = state
    elif name in ("BINPERSID", "PERSID"):
        # a tensor's storage, by its persistent id (torch: ("storage", type, key, device, numel))
        pid = stack.pop() if name == "BINPERSID" else None
        stack.append(_Object("<persistent>", (pid,) if pid is not None else ()))
    elif name in _NEW:
        stack.append(_NEW[name]())
    elif name in _TUPLES:
        n = _TUPLES[name]
        stack[-n:] = [tuple(stack[-n:])]
    elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
        items = _to_mark(stack)
        if name == "DICT":
            stack.append(_pairs(items))
        else:  # a frozenset's members are not settings: kept empty
            stack.append(tuple(items) if name == "TUPLE" else list(items) if name == "LIST" else ())
    elif name in ("SETITEM", "SETITEMS"):
        pairs = stack[-2:] if name == "SETITEM" else _to_mark(stack)
        if name == "SETITEM":
            del stack[-2:]
        _set_items(stack[-1], pairs)
    elif name in ("APPEND", "APPENDS", "ADDITEMS"):
        items = [stack.pop()] if name == "APPEND" else _to_mark(stack)
        _append(stack[-1], items)
    else:
        return False
    return True


def _pairs(items: list) -> dict:
    out: dict = {}
    _set_items(out, items)
    return out


def safe_unpickle(data: bytes) -> Any:
    """The value a pickle describes, with every object replaced by an ``_Object`` record.

    Nothing is imported or called: globals are names, calls are records of their
    arguments. Raises ``ValueError`` on an opcode this reader does not model.
    """
    stack: list = []
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = opcode.name
        if name in _QUIET:
            if name == "STOP":
                break
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            args = tuple(_to_mark(stack)) if name == "INST" else ()
            stack.append(_Object(f"{module}.{attr}", args))
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            _to_mark(stack)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif opcode.arg is not None and opcode.stack_after and not opcode.stack_before:
            stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif not _construct(name, stack):
            raise ValueError(f"pickle opcode {name} is not read")
    if len(stack) != 1:
        raise ValueError("the pickle does not end with one value")
    return stack[0]


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able plain data; None for what has no plain meaning (or sits
    deeper than a run's settings do: a pickle can make cycles)."""
    if depth > _MAX_DEPTH:
        return None
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        items = [_plain(v, depth + 1) for v in value] if len(value) <= _MAX_LIST else [None]
        return items if all(isinstance(v, _PRIMITIVE) for v in items) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, _Object):
        if isinstance(value.state, Mapping):
            return _plain(value.state, depth + 1)
        if value.items:
            return _plain(value.items, depth + 1)
        if (
            value.name.endswith("Path")
            and value.args
            and all(isinstance(a, str) for a in value.args)
        ):
            return posixpath.join(*value.args)  # pathlib pickles its parts
        if len(value.args) == 1 and isinstance(value.args[0], _PRIMITIVE):
            return _plain(value.args[0], depth)  # an enum member or a path: its value
    return None


def flatten_plain(doc: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b`` keys, keeping numbers, flags, text and short lists of them;
    no key that names a credential."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if _SECRET.search(str(key)) or str(key).startswith("_") or key in _RUNTIME:
            continue
        plain = _plain(value)
        if isinstance(plain, dict):
            out.update(flatten_plain(plain, f"{name}."))
        elif plain is not None and plain != []:
            out[name] = plain
    return out


def _pickled(path: Path) -> Any:
    """The plain value of a ``torch.save`` file (zip or legacy) or a plain pickle."""
    with open(path, "rb") as f:
        data = pickle_bytes(f, zipped=zipfile.is_zipfile(path), limit=PICKLE_LIMIT)
    if not data:
        raise ValueError(f"no pickle of at most {PICKLE_LIMIT >> 20} MiB in it")
    return _plain(safe_unpickle(data))


def _json_doc(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _hf_config(path: Path) -> dict[str, Any]:
    """The model's configuration: its top-level plain fields, as ``model.<key>``."""
    doc = _json_doc(path)
    return flatten_plain({k: v for k, v in doc.items() if not isinstance(v, dict)}, "model.")


def _trainer_state(path: Path) -> dict[str, Any]:
    doc = _json_doc(path)
    return flatten_plain({k: doc[k] for k in TRAINER_STATE_KEYS if k in doc})


def _training_args(path: Path) -> dict[str, Any]:
    doc = _pickled(path)
    if not isinstance(doc, dict):
        raise ValueError("not a pickled TrainingArguments")
    return flatten_plain(doc)


def _lightning(path: Path) -> dict[str, Any]:
    doc = _pickled(path)
    hp = doc.get("hyper_parameters") if isinstance(doc, dict) else None
    return flatten_plain(hp) if isinstance(hp, dict) else {}


def _orbax(path: Path) -> dict[str, Any]:
    custom = _json_doc(path).get("custom_metadata")
    return flatten_plain(custom) if isinstance(custom, dict) else {}


def _candidates(checkpoint: Path) -> list[tuple[Path, Any]]:
    """The files of ``checkpoint`` (or beside it) that may state hyper-parameters, each
    with its reader, in the order their values are merged (a later one wins)."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    found = [
        (folder / "training_args.bin", _training_args),
        (folder / "trainer_state.json", _trainer_state),
        (folder / "config.json", _hf_config),
    ]
    if checkpoint.suffix == ".ckpt":
        found.append((checkpoint, _lightning))
    for step_dir in (folder, folder.parent):
        found.append((step_dir / "_CHECKPOINT_METADATA", _orbax))
    return [(p, read) for p, read in found if p.is_file()]


def read_run_metadata(checkpoints: Iterable[Any]) -> RunMetadata:
    """The hyper-parameters the run's last checkpoint states (``checkpoints``: scan's
    :class:`~gramlin_analyze.io.discovery.CheckpointSource` list, or paths).

    Checkpoints behind a URL are not read for this (a note says so). A file that
    cannot be read adds a note instead of failing.
    """
    out = RunMetadata()
    paths = [(getattr(c, "step", None), getattr(c, "path", c)) for c in checkpoints]
    if not paths:
        return out
    # the highest step; among equals (or paths without steps), the last given
    _, _, last = max((-1 if s is None else s, i, p) for i, (s, p) in enumerate(paths))
    if "://" in str(last):
        out.notes.append(f"{last}: hyper-parameters are read from local checkpoints only")
        return out
    for path, read in _candidates(Path(last)):
        try:
            found = read(path)
        except (OSError, ValueError, LookupError, TypeError, StopIteration, BadZipFile) as err:
            # a damaged or hostile file (JSON errors are ValueErrors): noted, never fatal
            out.notes.append(f"{path}: hyper-parameters not read ({type(err).__name__}: {err})")
            continue
        if found:
            out.hyperparameters.update(found)
            out.sources.append(str(path))
    return out
