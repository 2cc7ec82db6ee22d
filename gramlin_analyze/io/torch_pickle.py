"""PyTorch ``torch.save`` files (``.pt``, ``.pth``, ``.bin``), loaded without running code.

Every load is ``torch.load(weights_only=True, map_location="cpu")``: PyTorch's
restricted unpickler builds tensors and plain containers and refuses every
other global, so a hostile file cannot execute anything; such a file raises
:class:`~gramlin_analyze.errors.UnsafeCheckpointError`, whatever its pickle
protocol (:mod:`.pickle_scan` names the callable when torch does not), while a
damaged file raises :class:`~gramlin_analyze.errors.CheckpointFormatError`.
A zip archive's declared member sizes are checked first (:mod:`.limits`).
Zip-format files
(the default since PyTorch 1.6) are memory-mapped, so listing tensors parses
only the pickle, never the tensor bytes; legacy files are read whole.

A file may hold a bare state dict or a training checkpoint such as
``{"model": state_dict, "optimizer": ..., "step": 7}``; the model's state dict
is found by :meth:`TorchPickleReader.select_state_dict`. The helpers here
(:func:`tensor_to_numpy`, :func:`tensor_info`, and :func:`optimizer_family`
from :mod:`.optimizer`) are shared by the other PyTorch-family readers.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import threading
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, UnsafeCheckpointError, UsageError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointMeta,
    TensorInfo,
    missing_tensor_error,
    to_numpy,
)
from gramlin_analyze.io.hf_conventions import ReadsModelConfig
from gramlin_analyze.io.limits import FLOOR, check_zip
from gramlin_analyze.io.optimizer import describe_state, find_optimizer_state, optimizer_family
from gramlin_analyze.io.pickle_scan import pickle_bytes, unsafe_globals
from gramlin_analyze.io.remote import RemotePath, as_path
from gramlin_analyze.io.torch_listing import list_state_dict

if TYPE_CHECKING:
    import torch

__all__ = [
    "TorchPickleReader",
    "STATE_DICT_KEYS",
    "load_torch_file",
    "tensor_info",
    "tensor_to_numpy",
    "optimizer_family",
    "find_optimizer_state",
    "as_int",
    "as_float",
    "missing_tensor_error",
]

#: Keys under which training scripts commonly store the model's state dict, tried in order.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "params",
    "weights",
)
_STEP_KEYS = ("global_step", "step", "iteration")
_LR_KEYS = ("lr", "learning_rate")

_ZIP_MAGIC = b"PK\x03\x04"
# A GLOBAL the restricted unpickler refused (builtins appear without their module);
# the identifier check keeps random bytes that happen to decode as the GLOBAL opcode
# from passing as a hostile file.
_REFUSED_GLOBAL = re.compile(
    r"GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*) (?:was not an allowed global|whose module)"
)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_REFUSED_CALL = re.compile(
    r"(?:call reduce for unrecognized function|Can only create new object .*? but got"
    r"|Can only build .*? but got) (.+)"
)


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor; torch is imported only by a load, so
    when it is not imported yet nothing can be one (listing stays torch-free)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    """:class:`TensorInfo` of a torch tensor (no bytes are read)."""
    return TensorInfo(
        name=name,
        shape=tuple(int(s) for s in tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
    )


def tensor_to_numpy(tensor: torch.Tensor, *, copy: bool = True) -> np.ndarray:
    """A NumPy array with the tensor's values, in ``(out, in, *kernel)`` order.

    bfloat16 and the float8 family become float32 and complex32 becomes
    complex64, since NumPy has no such dtypes. With ``copy=True`` the result
    owns its memory: a tensor from a memory-mapped load is backed by the file
    itself, and an array outliving the handle must not change (or fault) when
    the file is later rewritten.
    """
    import torch

    converted = tensor.dtype == torch.bfloat16
    numpy_floats = (torch.float16, torch.float32, torch.float64, torch.bfloat16)
    if tensor.is_floating_point() and tensor.dtype not in numpy_floats:
        tensor, converted = tensor.to(torch.float32), True
    elif tensor.dtype == torch.complex32:
        tensor, converted = tensor.to(torch.complex64), True
    arr = to_numpy(tensor)
    return arr.copy() if copy and not converted else arr


def _refusal(err: BaseException) -> str | None:
    """What a ``weights_only`` refusal names, or None when the file is merely unreadable."""
    message = str(err.__context__ or err)
    if match := _REFUSED_GLOBAL.search(message):
        return match.group(1)
    if match := _REFUSED_CALL.search(message):
        return match.group(1).strip()
    return None


def _corrupt(path: Path, err: BaseException) -> CheckpointFormatError:
    # torch wraps the unpickler's one-line reason in paragraphs about weights_only;
    # the reason is what tells a user what went wrong.
    inner = err.__context__ if isinstance(err, pickle.UnpicklingError) else None
    reason = str(inner or err)
    reason = reason.strip().splitlines()[0].split(". ")[0][:200] if reason.strip() else ""
    reason = reason or "unexpected end of file"
    if reason.startswith("Unsupported operand"):
        reason += (
            ": a pickle protocol above 2, which torch.load(weights_only=True) cannot read; "
            "re-save it with torch.save's default protocol"
        )
    return CheckpointFormatError(
        f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason}); the file "
        "is truncated, corrupt or not written by torch.save; re-save or re-copy the checkpoint"
    )


_TORCH_IMPORT = threading.Lock()


def _import_torch() -> Any:
    """``import torch`` one thread at a time (concurrent first imports see a partial module)."""
    with _TORCH_IMPORT:
        import torch

    return torch


def load_torch_file(path: os.PathLike | str) -> Any:
    """``torch.load`` a file with the restricted unpickler, memory-mapped when possible.

    Raises
    ------
    UnsafeCheckpointError
        The pickle references code outside PyTorch's allow-list (it would run
        code if loaded without restrictions).
    CheckpointFormatError
        The file is empty, truncated, corrupt or not a ``torch.save`` file.
    """
    torch = _import_torch()

    path = cast(Path, as_path(path))
    if isinstance(path, RemotePath):
        # torch.load reads the zip's directory and records through a seekable fsspec file.
        with path.open("rb") as remote:
            _check_archive(remote, path)
            return _checked_load(torch, remote, path, mmap=False)
    with path.open("rb") as f:
        # mmap works only for the zip format; legacy files are loaded the old way.
        zipped = _check_archive(f, path)
    return _checked_load(torch, path, path, mmap=zipped)


def _check_archive(f: Any, path: Path) -> bool:
    """Whether ``f`` is a zip; if so its declared member sizes must be within the cap.
    A zip that Python cannot list is left to torch, which reports the damage."""
    zipped = f.read(4) == _ZIP_MAGIC
    f.seek(0)
    if zipped:
        try:
            with zipfile.ZipFile(f) as archive:
                listed = archive.infolist()
        # zipfile raises NotImplementedError for a compression method it lacks
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError):
            listed = None
        if listed is not None:
            check_zip(path, listed, path.stat().st_size)
        f.seek(0)
    return zipped


def _code_in(path: Path) -> str | None:
    """The first callable outside torch's allow-list the file's pickle imports, found by
    parsing its opcodes (for refusals torch words as unsupported opcodes)."""
    try:
        with path.open("rb") as f:
            zipped = f.read(4) == _ZIP_MAGIC
            f.seek(0)
            data = pickle_bytes(f, zipped=zipped, limit=FLOOR)
    except Exception:  # unreadable: there is no pickle to judge, the load error stands
        return None
    culprits = [g for g in unsafe_globals(data) if _IDENTIFIER.fullmatch(g) or "<" in g]
    return culprits[0] if culprits else None


def _checked_load(torch: Any, source: Any, path: Path, *, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` of ``source``; refusals and damage become our errors."""
    try:
        return torch.load(source, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as err:
        culprit = _refusal(err) if isinstance(err, pickle.UnpicklingError) else None
        culprit = culprit or _code_in(path)
        if culprit is None:
            # torch's zip reader and unpickler fail on garbage with RuntimeError, OSError
            # (EINVAL), EOFError, IndexError, struct.error... depending on the damage.
            raise _corrupt(path, err) from err
        raise UnsafeCheckpointError(
            f"{path}: refused: it would run code: unpickling this file would import and call "
            f"{culprit}, and gramlin-analyze loads only tensors and plain "
            "containers (torch.load with weights_only=True). If you trust its source, load it "
            "yourself and re-save only the weights, e.g. torch.save(model.state_dict(), path) "
            "or safetensors.torch.save_file"
        ) from err


def _is_tensor_dict(node: Any) -> bool:
    return isinstance(node, Mapping) and bool(node) and all(_is_tensor(v) for v in node.values())


def _flatten_tensors(node: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if _is_tensor(value):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten_tensors(value, f"{name}."))
    return out


def _resolve_key(node: Any, parts: list[str]) -> Any:
    """Follow a dotted key, preferring the longest literal key at each level
    (so ``"ema.model"`` finds a key that itself contains a dot)."""
    if not parts:
        return node
    if isinstance(node, Mapping):
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if key in node:
                return _resolve_key(node[key], parts[i:])
    raise LookupError(".".join(parts))


def _describe_keys(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f"it holds a {type(obj).__name__}, not a dict"
    parts = []
    for key, value in obj.items():
        kind = "tensor" if _is_tensor(value) else type(value).__name__
        parts.append(f"{key!r} ({kind})")
    return "available top-level keys: " + (", ".join(parts) if parts else "none")


def as_int(value: Any) -> int | None:
    """An integer stored as a Python int or a one-element integer tensor, else None."""
    if _is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def as_float(value: Any) -> float | None:
    """A number stored as a Python number or a one-element tensor, else None."""
    if _is_tensor(value) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class TorchFileHandle(CheckpointHandle):
    """An open ``torch.save`` file: loaded (memory-mapped) once, on first use."""

    def __init__(self, reader: TorchPickleReader, path: os.PathLike | str):
        super().__init__(reader, path)
        self.reader: TorchPickleReader = reader
        self._obj: Any = None
        self._state: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._obj = self.reader.load(self.path)
            self._state = self.reader.select_state_dict(self._obj, self.path)
        return self._state

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            # A bare local state dict is listed from its pickle: planning needs no torch.
            plain = self._state is None and self.reader.state_dict_key is None
            listed = list_state_dict(self.path) if plain and isinstance(self.path, Path) else None
            self._tensors = listed or {n: tensor_info(n, t) for n, t in self._loaded().items()}
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        state = self._loaded()
        if name not in state:
            raise missing_tensor_error(name, self.path, list(state))
        return tensor_to_numpy(state[name])

    def read_metadata(self) -> CheckpointMeta:
        self._loaded()
        return self.reader.metadata_from(self._obj)

    def close(self) -> None:
        self._obj = None
        self._state = None
        super().close()


class TorchPickleReader(ReadsModelConfig):
    """Reader for ``torch.save`` files: a state dict or a training checkpoint dict.

    Parameters
    ----------
    state_dict_key : str, optional
        Where the model's state dict lives in a checkpoint dict, as a key or a
        dotted path (``"ema.model"``). By default a bare state dict is used as
        is; otherwise the first of :data:`STATE_DICT_KEYS` holding tensors,
        else the only nested dict made of tensors.

    Notes
    -----
    Loading always uses ``torch.load(weights_only=True, map_location="cpu")``,
    memory-mapped for zip-format files. A file whose pickle references other
    code raises :class:`~gramlin_analyze.errors.UnsafeCheckpointError`.
    Metadata: ``global_step``/``step``/``iteration`` as the step, ``epoch``,
    the learning rate of the first param group of a stored optimizer state,
    and the optimizer class inferred from that state. A transformers
    ``config.json`` beside the file (``pytorch_model.bin``) decides the
    orientation of ``Conv1D`` weights and the ties (:class:`ReadsModelConfig`).
    """

    name = "torch"
    suffixes: tuple[str, ...] = (".pt", ".pth", ".bin", ".pth.tar")

    reads_urls = True

    def __init__(self, *, state_dict_key: str | None = None, storage_options: dict | None = None):
        super().__init__(storage_options=storage_options)
        self.state_dict_key = state_dict_key

    def load(self, path: os.PathLike | str) -> Any:
        """The unpickled object of ``path`` (see :func:`load_torch_file`)."""
        return load_torch_file(path)

    def select_state_dict(self, obj: Any, path: os.PathLike | str) -> dict[str, torch.Tensor]:
        """The model's tensors in a loaded checkpoint, by parameter name."""
        if self.state_dict_key is not None:
            try:
                node = _resolve_key(obj, self.state_dict_key.split("."))
            except LookupError:
                raise UsageError(
                    f"{path}: no entry {self.state_dict_key!r} (state_dict_key); "
                    f"{_describe_keys(obj)}; pass one of these as state_dict_key"
                ) from None
            tensors = _flatten_tensors(node) if isinstance(node, Mapping) else {}
            if not tensors:
                raise UsageError(
                    f"{path}: entry {self.state_dict_key!r} holds no tensors "
                    f"({type(node).__name__}); {_describe_keys(obj)}; pass the key of the "
                    "model's state dict as state_dict_key"
                )
            return tensors
        if not isinstance(obj, Mapping):
            raise CheckpointFormatError(
                f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save the model's "
                "weights with torch.save(model.state_dict(), path)"
            )
        if _is_tensor_dict(obj):
            return dict(obj)
        for key in STATE_DICT_KEYS:
            node = obj.get(key)
            if isinstance(node, Mapping) and (tensors := _flatten_tensors(node)):
                return tensors
        nested = [key for key, value in obj.items() if _is_tensor_dict(value)]
        if len(nested) == 1:
            return dict(obj[nested[0]])
        # A state dict saved with a few extras beside it ({"w": ..., "step": 7}); nested
        # containers such as an optimizer state are not model weights.
        top_level = {k: v for k, v in obj.items() if _is_tensor(v)}
        if not nested and top_level:
            return top_level
        why = "several nested dicts of tensors" if nested else "none of them is a dict of tensors"
        raise CheckpointFormatError(
            f"{path}: cannot tell which entry is the model's state dict ({why}); "
            f"{_describe_keys(obj)}; pass state_dict_key (e.g. --state-dict-key KEY) "
            "to choose one"
        )

    def metadata_from(self, obj: Any) -> CheckpointMeta:
        """Step, epoch, learning rate and optimizer stored beside the weights."""
        meta = CheckpointMeta()
        if not isinstance(obj, Mapping) or _is_tensor_dict(obj):
            return meta
        for key in _STEP_KEYS:
            if (step := as_int(obj.get(key))) is not None:
                meta.step = step
                break
        meta.epoch = as_float(obj.get("epoch"))
        optimizer = find_optimizer_state(obj)
        if optimizer is not None:
            groups = optimizer["param_groups"]
            if groups and isinstance(groups[0], Mapping):
                meta.lr = as_float(groups[0].get("lr"))
            meta.optimizer = optimizer_family(optimizer)
            meta.extra["optimizer_params"] = describe_state(optimizer, "optimizer state").to_json()
        if meta.lr is None:
            meta.lr = next(
                (lr for key in _LR_KEYS if (lr := as_float(obj.get(key))) is not None), None
            )
        return meta

    handle_class = TorchFileHandle

    def read_metadata(self, path: os.PathLike | str) -> CheckpointMeta:
        with self.open(path) as handle:
            return handle.read_metadata()
