"""TorchScript archives (``torch.jit.save``): weights, and the architecture with them.

A TorchScript archive carries code that runs with the model, so this reader
refuses it unless the user opts in (``allow_code=True``; CLI
``--allow-torchscript-code``). Recognizing one is safe: it is a zip whose
members include ``code/`` and ``constants.pkl``, read from the zip directory
without unpickling anything.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, UnsafeCheckpointError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointMeta,
    CheckpointReader,
    TensorInfo,
    to_numpy,
)

__all__ = ["TorchScriptReader", "is_torchscript_archive"]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a zip holding TorchScript ``code/`` (no code is loaded)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        names = zipfile.ZipFile(p).namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


class _Handle(CheckpointHandle):
    def __init__(self, reader: TorchScriptReader, path: str | os.PathLike):
        super().__init__(reader, path)
        self.module = reader.load(path)
        self._sd = {k: v for k, v in self.module.state_dict().items()}

    def list_tensors(self) -> dict[str, TensorInfo]:
        return {
            k: TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in self._sd.items()
        }

    def read_tensor(self, name: str) -> np.ndarray:
        if name not in self._sd:
            raise KeyError(f"{name!r}: no such tensor in {self.path}")
        return to_numpy(self._sd[name])

    def read_metadata(self) -> CheckpointMeta:
        return CheckpointMeta()


class TorchScriptReader(CheckpointReader):
    """Reader for ``torch.jit.save`` archives; needs ``allow_code=True``."""

    name = "torchscript"
    suffixes = (".pt", ".pth", ".zip", ".ts", ".torchscript")
    handle_class = _Handle

    def __init__(self, allow_code: bool = False):
        self.allow_code = allow_code

    def guess_can_read(self, path: str | os.PathLike) -> bool:
        p = Path(path)
        return any(p.name.endswith(s) for s in self.suffixes) and is_torchscript_archive(p)

    def load(self, path: str | os.PathLike):
        """The archive as a ``torch.jit.ScriptModule`` (runs its code: opt-in only)."""
        from gramlin_analyze.capture.models import load_torchscript
        from gramlin_analyze.errors import ModelError

        if not self.allow_code:
            raise UnsafeCheckpointError(
                f"{path}: a TorchScript archive contains code that runs with the model; it is read "
                "only with --allow-torchscript-code (allow_code=True), if you trust its source"
            )
        try:
            return load_torchscript(path, allow_code=True)
        except ModelError as err:
            raise CheckpointFormatError(f"{path}: {err}") from err
