"""The reader interface: list tensors without reading bytes, read one on request."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from gramlin_analyze.errors import MissingTensorError
from gramlin_analyze.io.guard import guard_class
from gramlin_analyze.io.remote import RemotePath, as_path

__all__ = [
    "TensorInfo",
    "CheckpointMeta",
    "CheckpointReader",
    "CheckpointHandle",
    "to_numpy",
    "converted_shape",
    "missing_tensor_error",
]


@dataclass(frozen=True)
class TensorInfo:
    """What a reader knows about a tensor before reading its bytes.

    ``shape`` is already in the gramlin convention ``(out, in, *kernel)``;
    ``dtype`` is the dtype as stored in the file (``"bfloat16"`` included).
    ``source_layout`` records the framework's own convention: ``"out_in"``
    (PyTorch, ONNX Gemm with transB=1) or ``"in_out"`` (Keras/Flax dense
    kernels ``(in, out)``, conv kernels ``(*kernel, in, out)``), which the
    reader undoes in :meth:`CheckpointReader.read_tensor`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source_layout: str = "out_in"

    @property
    def nbytes(self) -> int:
        # math.prod: a corrupt header's shape must not wrap around int64.
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    """Bytes per element, including dtypes NumPy lacks (bfloat16, float8_*)."""
    if dtype == "bfloat16":
        return 2
    if dtype.startswith("float8"):
        return 1
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 4


def converted_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Shape in ``(out, in, *kernel)`` order of a tensor stored in ``layout``."""
    shape = tuple(int(s) for s in shape)
    if layout == "in_out" and len(shape) >= 2:
        *kernel, d_in, d_out = shape
        return (d_out, d_in, *kernel)
    return shape


@dataclass
class CheckpointMeta:
    """Metadata a checkpoint carries about itself (all optional)."""

    step: int | None = None
    epoch: float | None = None
    tokens_seen: float | None = None
    lr: float | None = None
    optimizer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def missing_tensor_error(
    name: str, path: os.PathLike | str, available: list[str]
) -> MissingTensorError:
    """The error (a ``KeyError``) for a tensor name a checkpoint does not hold."""
    shown = ", ".join(sorted(available)[:8]) + (", ..." if len(available) > 8 else "")
    return MissingTensorError(
        f"no tensor named {name!r} in {path}; it holds {len(available)} tensors ({shown}); "
        "list them with list_tensors() and use one of those names"
    )


def to_numpy(tensor_like: Any, *, layout: str = "out_in") -> np.ndarray:
    """Convert a framework tensor to a NumPy array in ``(out, in, *kernel)`` order.

    bfloat16 becomes float32 (NumPy has no native bfloat16); other float
    dtypes are kept.
    """
    torch: Any
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None
    if torch is not None and isinstance(tensor_like, torch.Tensor):
        t = tensor_like.detach()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        arr = t.cpu().numpy()
    else:
        arr = np.asarray(tensor_like)
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
    if layout == "in_out" and arr.ndim >= 2:
        nk = arr.ndim - 2
        arr = np.transpose(arr, (arr.ndim - 1, arr.ndim - 2, *range(nk)))
    return np.ascontiguousarray(arr).reshape(arr.shape)


class CheckpointReader:
    """A checkpoint format.

    Subclasses set :attr:`name` (the registry key, also stored in
    ``/steps.format``), :attr:`suffixes` and :attr:`is_directory_format`, and
    implement the three methods. ``path`` is a file, or a directory for
    directory formats (Hugging Face ``checkpoint-N/``, orbax steps, sharded
    safetensors' index file's directory). Readers must never execute code
    from the file (no unrestricted unpickling).

    Every public method of a subclass is wrapped (:mod:`.guard`): whatever it
    raises reaches the caller as a :class:`~gramlin_analyze.errors.GramlinError`
    naming the file, and special files are refused before they are opened.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_class(cls, on_handle=False)

    name: str = ""
    suffixes: tuple[str, ...] = ()
    is_directory_format: bool = False
    #: Optional framework needed, and the pip extra that installs it.
    requires: tuple[str, ...] = ()
    extra: str | None = None
    #: Whether the reader reads checkpoints behind fsspec URLs (:mod:`.remote`).
    reads_urls: bool = False
    #: fsspec options of the checkpoints' URLs (credentials, endpoint).
    storage_options: dict | None = None

    def __init__(self, *, storage_options: dict | None = None):
        self.storage_options = storage_options

    def guess_can_read(self, path: str | os.PathLike) -> bool:
        """Cheap test (name, a few header bytes) whether this reader applies."""
        p = as_path(path, self.storage_options)
        return p.is_file() and any(p.name.endswith(s) for s in self.suffixes)

    #: The handle class that does the reading. A reader that sets it gets
    #: :meth:`open`, :meth:`list_tensors` and :meth:`read_tensor` from it;
    #: otherwise it implements the last two itself.
    handle_class: type[CheckpointHandle] | None = None

    def list_tensors(self, path: str | os.PathLike) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes of every tensor, without reading tensor bytes
        where the format allows it."""
        if self.handle_class is None:
            raise TypeError(
                f"{type(self).__name__} must set handle_class or implement list_tensors"
            )
        with self.open(path) as handle:
            return handle.list_tensors()

    def read_tensor(self, path: str | os.PathLike, name: str) -> np.ndarray:
        """Read one tensor as NumPy, converted to ``(out, in, *kernel)`` order."""
        if self.handle_class is None:
            raise TypeError(f"{type(self).__name__} must set handle_class or implement read_tensor")
        with self.open(path) as handle:
            return handle.read_tensor(name)

    def read_metadata(self, path: str | os.PathLike) -> CheckpointMeta:
        """Step, epoch, learning rate... when the checkpoint stores them."""
        return CheckpointMeta()

    def files(self, path: str | os.PathLike) -> list[Path]:
        """Every file that belongs to this checkpoint (for fingerprints and sizes)."""
        p = as_path(path, self.storage_options)
        if isinstance(p, RemotePath):
            return cast(list[Path], p.files())  # used like Paths (RemotePath's subset)
        if p.is_dir():
            return sorted(f for f in p.rglob("*") if f.is_file())
        return [p]

    def open(self, path: str | os.PathLike) -> CheckpointHandle:
        """A handle that reads many tensors of one checkpoint efficiently.

        The default re-dispatches to :meth:`read_tensor`; formats that must
        load the whole file (pickles, msgpack) override it to load once.
        """
        return (self.handle_class or CheckpointHandle)(self, path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class CheckpointHandle:
    """An open checkpoint; use as a context manager. Its public methods are
    guarded like the reader's (:mod:`.guard`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        guard_class(cls, on_handle=True)

    def __init__(self, reader: CheckpointReader, path: str | os.PathLike):
        self.reader = reader
        # A URL reads through fsspec; RemotePath offers the Path operations readers use.
        self.path = cast(Path, as_path(path, reader.storage_options))
        self._tensors: dict[str, TensorInfo] | None = None

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            self._tensors = self.reader.list_tensors(self.path)
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        return self.reader.read_tensor(self.path, name)

    def read_metadata(self) -> CheckpointMeta:
        return self.reader.read_metadata(self.path)

    def close(self) -> None:
        self._tensors = None

    def __enter__(self) -> CheckpointHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


guard_class(CheckpointReader, on_handle=False)
guard_class(CheckpointHandle, on_handle=True)
