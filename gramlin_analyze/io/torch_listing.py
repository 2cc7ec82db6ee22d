"""The tensors of a ``torch.save``'d state dict, listed from its pickle without importing torch.

Planning an ingest needs only names, shapes and dtypes, and ``import torch``
costs the driver about 1.5 s of its serial start (docs/scaling.md). A
zip-format file (the default since PyTorch 1.6) keeps its pickle in
``data.pkl``; for the commonest file, ``torch.save(model.state_dict())``,
that pickle is a dict of ``torch._utils._rebuild_tensor_v2`` calls whose
arguments carry each tensor's size and whose storage names its dtype.
:func:`list_state_dict` reads it with :func:`~.run_meta.safe_unpickle`, which
imports and calls nothing.

Anything else returns None and the caller loads the file with torch, which
then words the refusal or the damage: a pickle importing anything outside a
small allow-list, a training checkpoint (a dict beside the weights: the
state-dict selection and the metadata stay torch's), legacy files, dtypes
NumPy has no name for, and storages missing from the archive or shorter than
the tensors viewing them.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gramlin_analyze.io.base import TensorInfo
from gramlin_analyze.io.pickle_scan import imported_globals, pickle_bytes
from gramlin_analyze.io.run_meta import PICKLE_LIMIT, _Object, safe_unpickle

__all__ = ["list_state_dict"]

#: ``torch.<Name>Storage`` -> (dtype as :func:`~.torch_pickle.tensor_info` words it, bytes per item)
STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
}
_REBUILD = "torch._utils._rebuild_tensor_v2"
_PARAMETER = "torch._utils._rebuild_parameter"
_ALLOWED = frozenset(
    {"collections.OrderedDict", _REBUILD, _PARAMETER} | {f"torch.{s}" for s in STORAGE_DTYPES}
)


def list_state_dict(path: Path) -> dict[str, TensorInfo] | None:
    """``{name: TensorInfo}`` of a zip-format bare state dict at local ``path``, else None.

    Reads ``data.pkl`` and the archive's directory only (no tensor bytes).
    None means "load it with torch": the file is not a plain dict of tensors,
    or something about it is not what ``torch.save`` writes.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                sizes = {i.filename: i.file_size for i in archive.infolist()}
            f.seek(0)
            data = pickle_bytes(f, zipped=True, limit=PICKLE_LIMIT)
        if not data or not set(imported_globals(data)) <= _ALLOWED:
            return None
        root = safe_unpickle(data)
    except Exception:  # damaged or unusual: torch's load reports it in its own words
        return None
    pkl = next((n for n in sizes if n.rsplit("/", 1)[-1] == "data.pkl"), "data.pkl")
    prefix = pkl[: -len("data.pkl")]
    items = root.items if _is_object(root, "collections.OrderedDict") else root
    if not isinstance(items, Mapping) or not items:
        return None
    out: dict[str, TensorInfo] = {}
    for name, value in items.items():
        info = _tensor(name, value, sizes, prefix)
        if info is None:
            return None
        out[name] = info
    return out


def _is_object(value: Any, name: str) -> bool:
    return isinstance(value, _Object) and value.name == name


def _tensor(name: Any, value: Any, sizes: dict[str, int], prefix: str) -> TensorInfo | None:
    """The tensor a ``_rebuild_tensor_v2`` record describes (a Parameter's unwrapped), if
    its storage is in the archive and long enough for the view; else None."""
    if _is_object(value, _PARAMETER) and value.args:
        value = value.args[0]
    if not (isinstance(name, str) and _is_object(value, _REBUILD) and len(value.args) >= 4):
        return None
    storage, offset, shape, stride = value.args[:4]
    pid = storage.args[0] if _is_object(storage, "<persistent>") and storage.args else None
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        return None
    kind, key, numel = pid[1], pid[2], pid[4]
    dtype = (
        STORAGE_DTYPES.get(kind.name.removeprefix("torch.")) if isinstance(kind, _Object) else None
    )
    dims = (
        (offset, *shape, *stride) if isinstance(shape, tuple) and isinstance(stride, tuple) else ()
    )
    if dtype is None or not dims or not all(type(d) is int and d >= 0 for d in (*dims, numel)):
        return None
    if len(shape) != len(stride) or sizes.get(f"{prefix}data/{key}") != numel * dtype[1]:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if math.prod(shape) and offset + extent > numel:
        return None
    return TensorInfo(name=name, shape=tuple(shape), dtype=dtype[0])
