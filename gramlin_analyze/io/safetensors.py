"""Safetensors checkpoints: one ``.safetensors`` file, or shards listed by an index.

Names, dtypes and shapes come from the file header through
:func:`safetensors.safe_open`, without reading tensor bytes; one tensor's
bytes are read when asked for. Sharded checkpoints follow the Hugging Face
layout: ``model.safetensors.index.json`` maps every tensor name to the shard
file holding it (``weight_map``); :class:`ShardedIndexReader` implements that
layout for any shard format and is reused for sharded ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from safetensors import SafetensorError, safe_open

from gramlin_analyze.errors import CheckpointFormatError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointReader,
    TensorInfo,
    missing_tensor_error,
)
from gramlin_analyze.io.hf_conventions import ReadsModelConfig
from gramlin_analyze.io.remote import RemotePath

__all__ = [
    "SafetensorsReader",
    "ShardedSafetensorsReader",
    "ShardedIndexReader",
    "ShardIndex",
    "read_shard_index",
]

#: safetensors dtype codes -> the dtype names TensorInfo records (torch's names).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _unreadable(path: Path, err: Exception) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path}: not a readable safetensors file ({err}); the file is truncated or corrupt; "
        "re-save or re-copy the checkpoint"
    )


#: Stored dtypes NumPy reads as they are; every other one (bf16, the float8 and
#: smaller float families, and any the format adds later) goes through torch,
#: which widens or rejects it as before (see tensor_to_numpy).
_NUMPY_NATIVE = frozenset(
    {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64", "C64"}
)


#: safetensors codes of those dtypes -> NumPy dtypes (the format is little-endian)
_NUMPY_CODES = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "C64": "<c8",
}


def _mapped_header(path: Path) -> tuple:
    """A local file's memory map, data offset, size and parsed header."""
    import mmap

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    n = int.from_bytes(mm[:8], "little")
    if not 2 <= n <= size - 8:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
    return (mm, 8 + n, size, json.loads(bytes(mm[8 : 8 + n])))


def _remote_header(path: RemotePath) -> tuple:
    """An object's data offset, size and header in two ranged reads (no map: None)."""
    size = path.stat().st_size
    n = int.from_bytes(path.read_range(0, 8), "little")
    if not 2 <= n <= size - 8:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
    return (None, 8 + n, size, json.loads(path.read_range(8, 8 + n)))


class SafetensorsHandle(CheckpointHandle):
    """An open ``.safetensors`` file: the header is parsed once, tensors read on request.

    Tensors of NumPy dtypes are read-only views of the file's memory map:
    no copy, no new memory (a copy of each tensor cost about three times as
    much as writing it to the store), and listing and reading most
    checkpoints never imports torch (about a second per process). bfloat16
    and float8 tensors go through torch, which widens them.
    """

    def __init__(self, reader: CheckpointReader, path: os.PathLike | str):
        super().__init__(reader, path)
        self._file = None
        self._torch_file = None
        self._stored: dict[str, str] = {}
        self._map: tuple | None = None

    def _mapped(self) -> tuple:
        """``(memory map or None, offset of the data, file size, header)``, opened once.

        Behind a URL there is no map: the header comes in two ranged reads and
        each tensor in one (:meth:`_remote_bytes`), never the whole object.
        """
        if self._map is None:
            try:
                self._map = (
                    _remote_header(self.path)
                    if isinstance(self.path, RemotePath)
                    else _mapped_header(self.path)
                )
            except (OSError, ValueError) as err:
                raise _unreadable(self.path, err) from err
        return self._map

    def _view(self, name: str, code: str) -> np.ndarray:
        """The tensor as a read-only view of the memory map, its extent checked."""
        mm, base, size, header = self._mapped()
        try:
            info = header[name]
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise _unreadable(self.path, ValueError(f"header entry of {name!r}: {err}")) from err
        dtype = np.dtype(_NUMPY_CODES[code])
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= start <= end and base + end <= size and end - start == count * dtype.itemsize):
            raise _unreadable(
                self.path,
                ValueError(f"tensor {name!r} lies outside the file or has the wrong size"),
            )
        if mm is None:
            data = cast(RemotePath, self.path).read_range(base + start, base + end)
            return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
        return np.frombuffer(mm, dtype=dtype, count=count, offset=base + start).reshape(shape)

    def _opened(self, framework: str = "numpy"):
        attr = "_file" if framework == "numpy" else "_torch_file"
        if getattr(self, attr) is None:
            try:
                setattr(self, attr, safe_open(str(self.path), framework=framework))
            except SafetensorError as err:
                raise _unreadable(self.path, err) from err
        return getattr(self, attr)

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None and isinstance(self.path, RemotePath):
            self._tensors = self._remote_infos()
        if self._tensors is None:
            f = self._opened()
            infos = {}
            for name in f.keys():
                header = f.get_slice(name)
                dtype = header.get_dtype()
                self._stored[name] = dtype
                infos[name] = TensorInfo(
                    name=name,
                    shape=tuple(int(s) for s in header.get_shape()),
                    dtype=_DTYPES.get(dtype, dtype.lower()),
                )
            self._tensors = infos
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        infos = self.list_tensors()
        if name not in infos:
            raise missing_tensor_error(name, self.path, list(infos))
        via_torch = self._stored.get(name) not in _NUMPY_NATIVE
        if not via_torch:
            return self._view(name, self._stored[name])
        if isinstance(self.path, RemotePath):
            return self._remote_via_torch(name)
        try:
            tensor = self._opened("pt").get_tensor(name)
        except SafetensorError as err:
            raise _unreadable(self.path, err) from err
        from gramlin_analyze.io.torch_pickle import tensor_to_numpy

        return tensor_to_numpy(tensor, copy=False)

    def _remote_infos(self) -> dict[str, TensorInfo]:
        """Names, dtypes and shapes from the header read by range (no tensor bytes)."""
        header = self._mapped()[3]
        infos = {}
        try:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._stored[name] = str(info["dtype"])
                infos[name] = TensorInfo(
                    name=name,
                    shape=tuple(int(d) for d in info["shape"]),
                    dtype=_DTYPES.get(self._stored[name], self._stored[name].lower()),
                )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _unreadable(self.path, ValueError(f"header entry: {err}")) from err
        return infos

    def _remote_via_torch(self, name: str) -> np.ndarray:
        """A bf16/fp8 tensor behind a URL: its byte range, loaded by safetensors as one
        tensor file, so torch widens it exactly as for a local file."""
        from safetensors.torch import load

        from gramlin_analyze.io.torch_pickle import tensor_to_numpy

        _, base, _, header = self._mapped()
        info = header[name]
        start, end = (int(x) for x in info["data_offsets"])
        data = cast(RemotePath, self.path).read_range(base + start, base + end)
        if len(data) != end - start:
            raise _unreadable(self.path, ValueError(f"tensor {name!r} lies outside the file"))
        one = {
            name: {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [0, len(data)]}
        }
        head = json.dumps(one).encode()
        head += b" " * (-len(head) % 8)
        try:
            tensor = load(len(head).to_bytes(8, "little") + head + data)[name]
        except SafetensorError as err:
            raise _unreadable(self.path, err) from err
        return tensor_to_numpy(tensor, copy=False)

    def close(self) -> None:
        self._file = None
        self._torch_file = None
        self._map = None  # the map closes when the last view of it is gone
        super().close()


class SafetensorsReader(ReadsModelConfig):
    """Reader for a single ``.safetensors`` file.

    Listing tensors reads only the header. bfloat16 and float8 tensors are
    returned as float32 (NumPy has no such dtypes); :class:`TensorInfo` keeps
    the stored dtype. A transformers ``config.json`` beside the file decides
    the orientation of ``Conv1D`` weights and the ties (:class:`ReadsModelConfig`).
    """

    name = "safetensors"
    suffixes = (".safetensors",)
    reads_urls = True

    handle_class = SafetensorsHandle


@dataclass(frozen=True)
class ShardIndex:
    """A parsed shard index: the index file and, per tensor name, its shard."""

    path: Path
    weight_map: dict[str, Path]

    @property
    def shards(self) -> list[Path]:
        """Every shard file, each once, in the order the index first names it."""
        return list(dict.fromkeys(self.weight_map.values()))


def read_shard_index(index_path: os.PathLike | str) -> ShardIndex:
    """Parse a Hugging Face ``*.index.json`` (``{"metadata": ..., "weight_map": {...}}``)."""
    index_path = Path(index_path)
    fix = "re-copy the index file together with its shards"
    try:
        doc = json.loads(index_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(
            f"{index_path}: not a valid shard index ({err}); it is truncated or corrupt; {fix}"
        ) from err
    weight_map = doc.get("weight_map") if isinstance(doc, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointFormatError(
            f"{index_path}: not a shard index: it has no 'weight_map' naming each tensor's "
            f"shard file; {fix}"
        )
    resolved: dict[str, Path] = {}
    for name, shard in weight_map.items():
        # Shards sit beside their index; a path elsewhere is malformed (or an attempt
        # to make the reader open an unrelated file).
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointFormatError(
                f"{index_path}: weight_map entry {name!r} -> {shard!r} is not a file name in "
                f"the index's directory; {fix}"
            )
        resolved[str(name)] = index_path.parent / shard
    return ShardIndex(index_path, resolved)


class ShardedHandle(CheckpointHandle):
    """An open sharded checkpoint: the index is parsed once, each shard opened on first use."""

    def __init__(self, reader: ShardedIndexReader, path: os.PathLike | str):
        super().__init__(reader, path)
        self.reader: ShardedIndexReader = reader
        self._index: ShardIndex | None = None
        self._shards: dict[Path, CheckpointHandle] = {}

    @property
    def index(self) -> ShardIndex:
        if self._index is None:
            self._index = read_shard_index(self.reader.index_path(self.path))
        return self._index

    def _shard(self, shard: Path) -> CheckpointHandle:
        if shard not in self._shards:
            if not shard.is_file():
                raise CheckpointFormatError(
                    f"{self.index.path}: shard {shard.name} named in the index is missing from "
                    f"{shard.parent}; re-copy the complete checkpoint"
                )
            self._shards[shard] = self.reader.shard_reader.open_raw(shard)
        return self._shards[shard]

    def list_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            by_shard: dict[Path, dict[str, TensorInfo]] = {}
            for shard in self.index.shards:
                by_shard[shard] = self._shard(shard).list_tensors()
            infos = {}
            for name, shard in self.index.weight_map.items():
                if name not in by_shard[shard]:
                    raise CheckpointFormatError(
                        f"{self.index.path}: the index puts {name!r} in {shard.name}, which does "
                        "not hold it; the shards do not belong to this index; re-copy the "
                        "complete checkpoint"
                    )
                infos[name] = by_shard[shard][name]
            self._tensors = infos
        return self._tensors

    def read_tensor(self, name: str) -> np.ndarray:
        shard = self.index.weight_map.get(name)
        if shard is None:
            raise missing_tensor_error(name, self.index.path, list(self.index.weight_map))
        return self._shard(shard).read_tensor(name)

    def close(self) -> None:
        for handle in self._shards.values():
            handle.close()
        self._shards.clear()
        self._index = None
        super().close()


class ShardedIndexReader(ReadsModelConfig):
    """Weights split over shard files by a Hugging Face index (``weight_map``).

    A transformers ``config.json`` beside the index applies to the whole
    checkpoint (:class:`ReadsModelConfig`); the shards are read raw.

    ``path`` is the index file or the directory holding :attr:`index_name`.
    Subclasses set :attr:`index_name`, :attr:`index_suffix` and
    :attr:`shard_reader`, the reader of one shard.
    """

    is_directory_format = True
    index_name: str = ""
    index_suffix: str = ""
    shard_reader: ReadsModelConfig

    def index_path(self, path: os.PathLike | str) -> Path:
        """The index file of a checkpoint given as the index or its directory."""
        p = Path(path)
        return p / self.index_name if p.is_dir() else p

    def guess_can_read(self, path: os.PathLike | str) -> bool:
        p = Path(path)
        if p.is_dir():
            return (p / self.index_name).is_file()
        return p.is_file() and p.name.endswith(self.index_suffix)

    handle_class = ShardedHandle

    def files(self, path: os.PathLike | str) -> list[Path]:
        """The index and every shard it names."""
        index = read_shard_index(self.index_path(path))
        return [index.path, *index.shards]


class ShardedSafetensorsReader(ShardedIndexReader):
    """Reader for sharded safetensors (``model.safetensors.index.json`` + shards).

    ``path`` is the ``*.safetensors.index.json`` file or a directory holding
    ``model.safetensors.index.json``. Listing reads each shard's header only.
    """

    name = "safetensors-sharded"
    index_name = "model.safetensors.index.json"
    index_suffix = ".safetensors.index.json"
    shard_reader = SafetensorsReader()
