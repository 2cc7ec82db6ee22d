"""ONNX models: the graph's initializers are the weights.

The model is parsed with ``onnx.load(path, load_external_data=False)``
(protobuf only, nothing executed); shapes come from the initializers' dims
and values from ``onnx.numpy_helper.to_array``, which reads external data
files relative to the model file.

Orientation comes from how the graph uses each initializer:

* ``B`` of ``Gemm`` with ``transB=1`` and ``Conv`` weights ``(out, in, *kernel)``
  are already in gramlin order;
* ``B`` of ``Gemm`` with ``transB=0`` and 2-d ``B`` of ``MatMul`` are ``(in,
  out)`` and are transposed;
* ``ConvTranspose`` weights ``(in, out, *kernel)`` get their first two axes
  swapped;
* anything else, or an initializer used in conflicting ways (tied weights),
  is returned as stored.

Names are the initializer names with ``/`` turned into ``.``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, MissingDependencyError
from gramlin_analyze.io.base import (
    CheckpointHandle,
    CheckpointReader,
    TensorInfo,
    converted_shape,
    missing_tensor_error,
    to_numpy,
)

__all__ = ["OnnxReader"]

_HINT = "pip install 'gramlin-analyze[onnx]'"
_FIX = "re-export the model or copy the file again"
#: Element types stored several to a byte in ``raw_data``.
_PACKED = ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2")


def _onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper  # noqa: F401  (loads the submodule onto ``onnx``)
    except ImportError as err:
        raise MissingDependencyError(
            f"reading .onnx files needs onnx, which is not installed; {_HINT}"
        ) from err
    return onnx


@dataclass(frozen=True)
class _Entry:
    index: int
    info: TensorInfo
    convert: str  # "as_is", "in_out" (2-d transpose), "swap01" (ConvTranspose)


def _graphs(graph: Any) -> Iterator[Any]:
    """The graph and every subgraph of If/Loop/Scan nodes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _uses(onnx: Any, graph: Any) -> dict[str, set[str]]:
    """Initializer name -> the conversions its uses in the graph call for."""
    uses: dict[str, set[str]] = {}

    def add(name: str, convert: str) -> None:
        uses.setdefault(name, set()).add(convert)

    for g in _graphs(graph):
        for node in g.node:
            # Invalid UTF-8 comes back as bytes; such a name matches no initializer's.
            inputs = [n if isinstance(n, str) else repr(n) for n in node.input]
            if node.op_type == "Gemm" and len(inputs) > 1:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                add(inputs[1], "as_is" if attrs.get("transB", 0) else "in_out")
            elif node.op_type == "MatMul" and len(inputs) > 1:
                add(inputs[1], "in_out")
            elif node.op_type == "ConvTranspose" and len(inputs) > 1:
                add(inputs[1], "swap01")
            for name in inputs:
                if not (node.op_type in ("Gemm", "MatMul", "ConvTranspose") and name == inputs[1]):
                    add(name, "as_is")
    return uses


def _np_dtype(onnx: Any, tensor: Any, p: Path) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointFormatError(
            f"{p}: initializer {tensor.name!r} has unknown element type {tensor.data_type}; "
            f"the file is corrupt or needs a newer onnx, {_FIX}"
        ) from err


def _expected_bytes(onnx: Any, tensor: Any, shape: tuple[int, ...], dtype: np.dtype) -> int | None:
    """Bytes ``raw_data`` must hold, or None for packed sub-byte types."""
    packed = {getattr(onnx.TensorProto, n, None) for n in _PACKED}
    if tensor.data_type in packed:
        return None
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _external_location(tensor: Any) -> str | None:
    for kv in tensor.external_data:
        if kv.key == "location":
            return kv.value
    return None


class OnnxReader(CheckpointReader):
    """ONNX model files (``.onnx``); the initializers are read as tensors.

    Notes
    -----
    Weights stored as external data are read from files next to the model
    and listed by :meth:`files`. See the module docstring for the
    orientation rules, which follow the graph's ``Gemm``/``MatMul``/``Conv``
    nodes.
    """

    name = "onnx"
    suffixes = (".onnx",)
    requires = ("onnx",)
    extra = "onnx"

    def list_tensors(self, path: str | os.PathLike) -> dict[str, TensorInfo]:
        _, entries = self._load(path)
        return {name: e.info for name, e in entries.items()}

    def read_tensor(self, path: str | os.PathLike, name: str) -> np.ndarray:
        model, entries = self._load(path)
        return self._read(model, entries, Path(path), name)

    def files(self, path: str | os.PathLike) -> list[Path]:
        p = Path(path)
        extra = set()
        try:
            model, _ = self._load(path)
            for tensor in model.graph.initializer:
                location = _external_location(tensor)
                if location is not None:
                    self._external_file(p, location)
                    extra.add(Path(os.path.normpath(p.parent / location)))
        except CheckpointFormatError:
            # Discovery lists files before anything is read; a damaged model
            # is reported, with its reason, when its tensors are read.
            return [p]
        return [p, *sorted(extra)]

    def open(self, path: str | os.PathLike) -> CheckpointHandle:
        return _OnnxHandle(self, path)

    def _load(self, path: str | os.PathLike) -> tuple[Any, dict[str, _Entry]]:
        onnx = _onnx()
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such ONNX file")
        try:
            model = onnx.load(p, load_external_data=False)
        except Exception as err:
            # protobuf raises DecodeError (not a ValueError) for damaged bytes.
            raise CheckpointFormatError(
                f"{p}: not a readable ONNX model ({type(err).__name__}: {err}); "
                f"the file is truncated or corrupt, {_FIX}"
            ) from err
        if not model.HasField("graph"):
            raise CheckpointFormatError(
                f"{p}: holds no ONNX graph (empty or not an ONNX model); {_FIX}"
            )
        return model, self._entries(onnx, model, p)

    def _entries(self, onnx: Any, model: Any, p: Path) -> dict[str, _Entry]:
        uses = _uses(onnx, model.graph)
        entries: dict[str, _Entry] = {}
        raw_names = {t.name for t in model.graph.initializer}
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
                continue
            if isinstance(tensor.name, bytes):  # protobuf hands back invalid UTF-8 as bytes
                raise CheckpointFormatError(
                    f"{p}: initializer name {tensor.name[:60]!r} is not valid UTF-8, as ONNX "
                    f"requires; the file is corrupt, {_FIX}"
                )
            shape = tuple(int(d) for d in tensor.dims)
            if any(d < 0 for d in shape):
                raise CheckpointFormatError(
                    f"{p}: initializer {tensor.name!r} has negative dimensions {shape}; "
                    f"the file is corrupt, {_FIX}"
                )
            dtype = _np_dtype(onnx, tensor, p)
            if tensor.HasField("raw_data") and _external_location(tensor) is None:
                expected = _expected_bytes(onnx, tensor, shape, dtype)
                if expected is not None and len(tensor.raw_data) != expected:
                    raise CheckpointFormatError(
                        f"{p}: initializer {tensor.name!r} holds {len(tensor.raw_data)} bytes "
                        f"for shape {shape}, expected {expected}; the file is corrupt, {_FIX}"
                    )
            converts = uses.get(tensor.name, {"as_is"})
            convert = next(iter(converts)) if len(converts) == 1 else "as_is"
            if convert == "in_out" and len(shape) != 2:
                convert = "as_is"
            if convert == "swap01" and len(shape) < 2:
                convert = "as_is"
            if convert == "in_out":
                out_shape, layout = converted_shape(shape, "in_out"), "in_out"
            elif convert == "swap01":
                out_shape, layout = (shape[1], shape[0], *shape[2:]), "in_out"
            else:
                out_shape, layout = shape, "out_in"
            name = tensor.name.replace("/", ".").strip(".") or tensor.name
            if name != tensor.name and (name in raw_names or name in entries):
                name = tensor.name
            entries[name] = _Entry(index, TensorInfo(name, out_shape, dtype.name, layout), convert)
        return entries

    def _external_file(self, p: Path, location: str) -> Path:
        base = p.resolve().parent
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise CheckpointFormatError(
                f"{p}: external data location {location!r} points outside the model's "
                "directory; refusing to read it"
            )
        return target

    def _read(self, model: Any, entries: dict[str, _Entry], p: Path, name: str) -> np.ndarray:
        onnx = _onnx()
        try:
            entry = entries[name]
        except KeyError:
            raise missing_tensor_error(name, p, list(entries)) from None
        tensor = model.graph.initializer[entry.index]
        location = _external_location(tensor)
        if location is not None:
            self._external_file(p, location)
        try:
            arr = onnx.numpy_helper.to_array(tensor, base_dir=str(p.resolve().parent))
        except (ValueError, TypeError, OSError) as err:
            raise CheckpointFormatError(
                f"{p}: initializer {tensor.name!r} cannot be decoded ({err}); "
                f"the file or its external data is truncated or corrupt, {_FIX}"
            ) from err
        if entry.convert == "in_out":
            return to_numpy(arr, layout="in_out")
        if entry.convert == "swap01":
            return to_numpy(np.swapaxes(arr, 0, 1))
        # to_numpy's ascontiguousarray turns 0-d arrays into 1-d; keep scalars scalar.
        return to_numpy(arr).reshape(arr.shape)


class _OnnxHandle(CheckpointHandle):
    """Parses the model once and reads every initializer from it."""

    reader: OnnxReader

    def __init__(self, reader: OnnxReader, path: str | os.PathLike):
        super().__init__(reader, path)
        self._loaded: tuple[Any, dict[str, _Entry]] | None = None

    def _ensure(self) -> tuple[Any, dict[str, _Entry]]:
        if self._loaded is None:
            self._loaded = self.reader._load(self.path)
        return self._loaded

    def list_tensors(self) -> dict[str, TensorInfo]:
        return {name: e.info for name, e in self._ensure()[1].items()}

    def read_tensor(self, name: str) -> np.ndarray:
        model, entries = self._ensure()
        return self.reader._read(model, entries, self.path, name)

    def close(self) -> None:
        self._loaded = None
        super().close()
