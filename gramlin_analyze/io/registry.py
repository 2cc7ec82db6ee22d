"""Name -> reader registry, in the manner of ``fsspec.registry``.

Built-in readers are imported only when first used, so a missing optional
framework costs nothing until a file of that format appears; then the
error says which extra to install. Third parties register readers through
the ``gramlin_analyze.readers`` entry-point group (value: ``module:Class``).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from pathlib import Path

from gramlin_analyze.errors import (
    CheckpointFormatError,
    GramlinError,
    MissingDependencyError,
    UsageError,
)
from gramlin_analyze.io.base import CheckpointReader
from gramlin_analyze.io.guard import check_source

__all__ = [
    "known_readers",
    "get_reader",
    "reader_for",
    "register_reader",
    "guess_reader",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "gramlin_analyze.readers"

#: name -> (import path "module:Class", install hint)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "hf-trainer": ("gramlin_analyze.io.hf:HFTrainerReader", None),
    "safetensors-sharded": ("gramlin_analyze.io.safetensors:ShardedSafetensorsReader", None),
    "safetensors": ("gramlin_analyze.io.safetensors:SafetensorsReader", None),
    "lightning": ("gramlin_analyze.io.lightning:LightningReader", None),
    "torchscript": ("gramlin_analyze.io.torchscript:TorchScriptReader", None),
    "torch": ("gramlin_analyze.io.torch_pickle:TorchPickleReader", None),
    "npz": ("gramlin_analyze.io.npz:NpzReader", None),
    "keras": (
        "gramlin_analyze.io.keras:KerasWeightsReader",
        "pip install 'gramlin-analyze[keras]'",
    ),
    "orbax": ("gramlin_analyze.io.orbax:OrbaxReader", "pip install 'gramlin-analyze[jax]'"),
    "flax": ("gramlin_analyze.io.flax:FlaxMsgpackReader", "pip install 'gramlin-analyze[jax]'"),
    "onnx": ("gramlin_analyze.io.onnx:OnnxReader", "pip install 'gramlin-analyze[onnx]'"),
}

_registry: dict[str, tuple[str, str | None]] = dict(_BUILTIN)
_instances: dict[str, CheckpointReader] = {}
_entry_points_loaded = False


def register_reader(
    name: str,
    target: str | type[CheckpointReader],
    *,
    hint: str | None = None,
    clobber: bool = False,
) -> None:
    """Register a reader class (or its ``"module:Class"`` path) under ``name``.

    Registering a name twice is an error unless ``clobber=True``.
    """
    if name in _registry and not clobber:
        raise UsageError(
            f"a checkpoint reader named {name!r} is already registered; pass clobber=True to replace it"
        )
    if isinstance(target, type):
        _instances[name] = target()
        target = f"{target.__module__}:{target.__qualname__}"
    else:
        _instances.pop(name, None)
    _registry[name] = (target, hint)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _registry:
            _registry[ep.name] = (ep.value, None)


def known_readers() -> list[str]:
    """Names of every registered reader, built-ins first (the order they are tried)."""
    _load_entry_points()
    return list(_registry)


def get_reader(name: str, **options: object) -> CheckpointReader:
    """The reader registered under ``name``, imported on first use.

    ``options`` go to the reader's constructor (e.g. ``state_dict_key`` of
    the PyTorch reader); without options a shared instance is returned.
    """
    _load_entry_points()
    if name in _instances and not options:
        return _instances[name]
    try:
        target, hint = _registry[name]
    except KeyError:
        raise UsageError(
            f"no checkpoint reader named {name!r}; known readers: {', '.join(known_readers())}"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        raise MissingDependencyError(
            f"the {name!r} checkpoint reader needs {missing!r}, which is not installed"
            + (f"; {hint}" if hint else "")
        ) from err
    cls = getattr(module, attr)
    if options:
        return cls(**options)
    reader = cls()
    _instances[name] = reader
    return reader


def reader_for(name: str, options: dict | None = None) -> CheckpointReader:
    """The reader ``name`` configured with those of ``options`` its constructor takes.

    Options are shared across formats (``state_dict_key`` for pickles,
    ``allow_code`` for TorchScript); each reader gets the ones it accepts.
    ``conv1d_layers`` (the layers a model source says are ``Conv1D``) wraps any
    reader so those weights are presented ``(out, in)``
    (:class:`~gramlin_analyze.io.hf_conventions.ModuleOrientedReader`).
    """
    import inspect

    if not options:
        return get_reader(name)
    cls = type(get_reader(name))
    params = inspect.signature(cls.__init__).parameters
    accepted = {k: v for k, v in options.items() if k in params and v is not None}
    reader = get_reader(name, **accepted) if accepted else get_reader(name)
    if options.get("conv1d_layers"):
        from gramlin_analyze.io.hf_conventions import ModuleOrientedReader

        return ModuleOrientedReader(reader, options["conv1d_layers"])
    return reader


def guess_reader(path: str | os.PathLike, *, format: str | None = None) -> CheckpointReader:
    """The reader for ``path``: the one named by ``format``, or the first that claims it."""
    if format is not None:
        return get_reader(format)
    p = Path(path)
    check_source(p)
    missing: list[MissingDependencyError] = []
    failures: list[str] = []
    for name in known_readers():
        try:
            reader = get_reader(name)
        except MissingDependencyError as err:
            missing.append(err)
            continue
        try:
            if reader.guess_can_read(p):
                return reader
        except GramlinError as err:  # could not tell: the next reader may
            failures.append(str(err))
    msg = f"{p}: no checkpoint reader recognizes this file"
    if failures:
        msg += " (" + "; ".join(failures) + ")"
    if missing:
        msg += " (some readers are unavailable: " + "; ".join(str(m) for m in missing) + ")"
    raise CheckpointFormatError(msg + "; pass --format NAME to choose one explicitly")
