"""PyTorch Lightning ``.ckpt`` files, loaded without running code.

A Lightning checkpoint is a ``torch.save`` dict: ``state_dict``,
``global_step``, ``epoch``, ``optimizer_states``, ``lr_schedulers``,
``callbacks``, ``loops`` and the ``hyper_parameters`` saved by
``save_hyperparameters()``. Everything but the hyperparameters loads with
PyTorch's restricted unpickler as is; hyperparameters often hold a few
harmless objects that it refuses, so the load adds a small allow-list for
its duration (:data:`LIGHTNING_SAFE_GLOBALS`). Lightning itself is never
imported: the allow-list maps each name to a standard-library stand-in.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from gramlin_analyze.io.base import CheckpointMeta
from gramlin_analyze.io.torch_pickle import TorchPickleReader, as_float

__all__ = ["LightningReader", "LIGHTNING_SAFE_GLOBALS", "lightning_safe_globals"]


class _AttributeDictAsDict:
    """Stand-in for Lightning's ``AttributeDict`` (a ``dict`` subclass) that unpickles
    to a plain ``dict``.

    The restricted unpickler fills only exact ``dict`` instances, so even the real
    class, allow-listed, fails to load; the values matter here, not the class.
    """

    def __new__(cls, *args: Any) -> Any:  # a plain dict, not an instance of cls
        return dict(*args)


#: Globals a real Lightning checkpoint may reference beyond PyTorch's defaults,
#: as ``(stand-in, name in the pickle)``. Paths (``data_dir`` hyperparameters)
#: become pure paths, which never touch the file system and load on any OS;
#: ``argparse.Namespace`` (nested in hyperparameters) only stores attributes;
#: ``AttributeDict`` (under its current and former module paths) becomes a dict.
LIGHTNING_SAFE_GLOBALS: list[tuple[Any, str]] = [
    *(
        (stand_in, f"{module}.{name}")
        for module in ("pathlib", "pathlib._local")
        for name, stand_in in (
            ("PosixPath", pathlib.PurePosixPath),
            ("PurePosixPath", pathlib.PurePosixPath),
            ("WindowsPath", pathlib.PureWindowsPath),
            ("PureWindowsPath", pathlib.PureWindowsPath),
        )
    ),
    (argparse.Namespace, "argparse.Namespace"),
    *(
        (_AttributeDictAsDict, f"{module}.AttributeDict")
        for module in (
            "lightning.fabric.utilities.data",
            "lightning_fabric.utilities.data",
            "pytorch_lightning.utilities.parsing",
        )
    ),
]

# PyTorch keeps allow-listed globals in one process-wide set; a lock keeps one
# thread's exit from removing entries another thread's load still relies on.
_ALLOW_LIST_LOCK = threading.Lock()


@contextmanager
def lightning_safe_globals() -> Iterator[None]:
    """Allow :data:`LIGHTNING_SAFE_GLOBALS` for ``torch.load(weights_only=True)``
    inside the block only, leaving entries the user added globally in place."""
    import torch

    with _ALLOW_LIST_LOCK:
        present = set(torch.serialization.get_safe_globals())
        added: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
            entry for entry in LIGHTNING_SAFE_GLOBALS if entry not in present
        ]
        with torch.serialization.safe_globals(added):
            yield


class LightningReader(TorchPickleReader):
    """Reader for PyTorch Lightning checkpoints (``.ckpt``).

    Loads with ``torch.load(weights_only=True)`` plus the scoped allow-list
    :data:`LIGHTNING_SAFE_GLOBALS`; any other global raises
    :class:`~gramlin_analyze.errors.UnsafeCheckpointError`. Lightning need
    not be installed.

    Parameters
    ----------
    state_dict_key : str, optional
        Entry holding the weights; default ``state_dict`` (Lightning's), or
        the usual fallbacks of :class:`TorchPickleReader` for Fabric files.

    Notes
    -----
    Metadata: ``global_step`` as the step, ``epoch``, the learning rate of
    the first optimizer's first param group (else the first scheduler's
    ``_last_lr``), the optimizer class inferred from its state, and the
    Lightning version in ``extra["lightning_version"]``.
    """

    name = "lightning"
    suffixes = (".ckpt",)

    def load(self, path: os.PathLike | str) -> Any:
        with lightning_safe_globals():
            return super().load(path)

    def metadata_from(self, obj: Any) -> CheckpointMeta:
        meta = super().metadata_from(obj)
        if not isinstance(obj, Mapping):
            return meta
        if meta.lr is None:
            schedulers = obj.get("lr_schedulers")
            if isinstance(schedulers, list | tuple) and schedulers:
                last = schedulers[0].get("_last_lr") if isinstance(schedulers[0], Mapping) else None
                if isinstance(last, list | tuple) and last:
                    meta.lr = as_float(last[0])
        version = obj.get("pytorch-lightning_version")
        if isinstance(version, str):
            meta.extra["lightning_version"] = version
        return meta
