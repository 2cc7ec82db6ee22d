"""TorchScript archives (``torch.jit.save``): weights, and the architecture with them.

A TorchScript archive carries code that runs with the model, so this reader
refuses it unless the user opts in (``allow_code=True``; CLI
``--allow-torchscript-code``). Recognizing one is safe: it is a zip whose
members include ``code/`` and ``constants.pkl``, read from the zip directory
without unpickling anything.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, ModelError, UnsafeCheckpointError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointMeta,
    CheckpointReader,
    TensorInfo,
    missing_tensor_error,
    to_numpy,
)

if TYPE_CHECKING:
    import torch

__all__ = ["TorchScriptReader", "is_torchscript_archive", "load_torchscript"]


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a zip holding TorchScript ``code/`` (no code is loaded).

    Any zip it cannot list (damaged, or member names that are not valid UTF-8)
    is not a TorchScript archive: this runs on every ``.pt`` file, and the
    PyTorch reader reports the damage when it reads the file.
    """
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
    # zipfile raises NotImplementedError for a compression method it lacks: not TorchScript
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
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
            raise missing_tensor_error(name, self.path, list(self._sd))
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
        if not self.allow_code:
            raise UnsafeCheckpointError(
                f"{path}: a TorchScript archive contains code that runs with the model; it is read "
                "only with --allow-torchscript-code (allow_code=True), if you trust its source"
            )
        try:
            return load_torchscript(path, allow_code=True)
        except ModelError as err:
            raise CheckpointFormatError(f"{path}: {err}") from err


def load_torchscript(
    path: str | os.PathLike, *, allow_code: bool = False
) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU.

    TorchScript archives contain code (the compiled ``forward`` and every
    method) that runs when the model runs. Loading one is therefore the
    user's explicit choice: ``allow_code=True`` (on the CLI a loudly named
    flag). Only archives from a trusted source should be loaded.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``torch.jit.save`` archive.
    allow_code : bool, default False
        Must be True; the default refuses.

    Returns
    -------
    torch.jit.ScriptModule
        The module, in eval mode. Capture runs it through its inlined graph
        (hooks are not available on script modules).

    Raises
    ------
    UnsafeCheckpointError
        Without ``allow_code=True``.
    ModelError
        If the file is missing or not a TorchScript archive.
    """
    import torch

    path = Path(path)
    if not allow_code:
        raise UnsafeCheckpointError(
            f"TorchScript archive {str(path)!r} contains code that runs with the model; "
            "load it only if you trust its source, by passing allow_code=True "
            "(CLI: --allow-torchscript-code)"
        )
    if not path.is_file():
        raise ModelError(f"TorchScript archive {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # torch 2.9+ deprecates TorchScript; the user chose this source explicitly.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as err:
        raise ModelError(
            f"{str(path)!r} is not a loadable TorchScript archive ({err}); "
            "save the model with torch.jit.save(torch.jit.script(model), path)"
        ) from err
    return module.eval()
