"""Probe sets: the fixed inputs (and labels or targets) run through every checkpoint.

A probe file is ``.npz`` (read with ``allow_pickle=False``), ``.safetensors``,
or ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``; a dict of
tensors). It holds

- ``inputs``: shape ``(n_samples, ...)``, floating point (or integer token ids);
- exactly one of ``labels`` (integer class indices, ``(n_samples,)`` or
  ``(n_samples, seq_len)``) or ``targets`` (real values, ``(n_samples, ...)``);
- optionally ``sample_id``: ``(n_samples,)`` integers or strings.

A summary of the file (array names, shapes, dtypes, sample count) is validated
against ``schemas/probe.schema.json``; the code then checks that every leading
dimension agrees and that values are finite. bfloat16 arrays become float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import jsonschema
import numpy as np

from gramlin_analyze.errors import ProbeError, UnsafeCheckpointError
from gramlin_analyze.io.remote import RemotePath, is_url

__all__ = ["ProbeSet", "cached_probe", "load_probe", "make_probe", "probe_summary", "PROBE_KEYS"]

#: Array names a probe file may hold, in fingerprint order.
PROBE_KEYS = ("inputs", "labels", "targets", "sample_id")

_SCHEMA_NAME = "probe.schema.json"


@dataclass(frozen=True)
class ProbeSet:
    """A validated probe set.

    Attributes
    ----------
    inputs : numpy.ndarray
        Model inputs, shape ``(n_samples, ...)``.
    labels : numpy.ndarray or None
        Integer class indices (classification), leading axis ``n_samples``.
    targets : numpy.ndarray or None
        Real-valued targets (regression), leading axis ``n_samples``.
    sample_id : numpy.ndarray or None
        One id per sample.
    fingerprint : str
        SHA-256 over each array's name, dtype, shape and bytes (after the
        bfloat16 -> float32 conversion), so the same data in any file format
        has the same fingerprint.
    path : pathlib.Path or None
        The file it was read from (None when built in memory).
    """

    inputs: np.ndarray
    labels: np.ndarray | None
    targets: np.ndarray | None
    sample_id: np.ndarray | None
    fingerprint: str
    path: Path | None = None

    @property
    def n_samples(self) -> int:
        """Number of probe samples (leading dimension of every array)."""
        return int(self.inputs.shape[0])

    @property
    def y(self) -> np.ndarray:
        """The labels when present, else the targets."""
        return self.labels if self.labels is not None else self.targets

    @property
    def target_kind(self) -> str:
        """``"labels"`` or ``"targets"``."""
        return "labels" if self.labels is not None else "targets"

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by name."""
        out = {}
        for key in PROBE_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@functools.cache
def _schema() -> dict[str, Any]:
    # Installed wheels carry the schema inside the package; a source checkout
    # keeps it at the repository root.
    packaged = resources.files("gramlin_analyze").joinpath("schemas", _SCHEMA_NAME)
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8"))
    source = Path(__file__).resolve().parents[2] / "schemas" / _SCHEMA_NAME
    return json.loads(source.read_text(encoding="utf-8"))


def _dtype_name(arr: np.ndarray) -> str:
    if arr.dtype.kind == "U":
        return "str"
    return arr.dtype.name


def probe_summary(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The JSON object validated against ``schemas/probe.schema.json``.

    Parameters
    ----------
    arrays : Mapping of str to numpy.ndarray
        The arrays of a probe file, by name.

    Returns
    -------
    dict
        ``{"keys": [...], "shapes": {name: [...]}, "dtypes": {name: str},
        "n_samples": int}``; ``n_samples`` is the leading dimension of
        ``inputs`` (0 when absent or scalar).
    """
    inputs = arrays.get("inputs")
    n = int(inputs.shape[0]) if inputs is not None and inputs.ndim else 0
    return {
        "keys": list(arrays),
        "shapes": {k: [int(s) for s in v.shape] for k, v in arrays.items()},
        "dtypes": {k: _dtype_name(v) for k, v in arrays.items()},
        "n_samples": n,
    }


def _where(path: Path | None) -> str:
    return f"probe file {str(path)!r}" if path is not None else "probe set"


def _fix_hint(err: jsonschema.ValidationError) -> str | None:
    """The deepest ``x-fix`` hint on the schema path of a validation error."""
    node: Any = _schema()
    fix = None
    for key in [*err.absolute_schema_path, None]:
        if isinstance(node, dict) and "x-fix" in node:
            fix = node["x-fix"]
        if key is None or key == "$ref":
            break
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    return fix


#: Names people give probe arrays, and the probe key each likely means.
_ALIASES = {
    "x": "inputs",
    "input": "inputs",
    "data": "inputs",
    "features": "inputs",
    "images": "inputs",
    "input_ids": "inputs",
    "y": "labels",
    "label": "labels",
    "target": "targets",
    "ids": "sample_id",
}

_EXPECTED = (
    "'inputs' (n_samples, ...), exactly one of 'labels' (integer class indices) or "
    "'targets' (real values), and optionally 'sample_id'"
)


def _key_problem(arrays: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with the array names (unknown, missing, both labels and targets), if anything."""
    unknown = [k for k in arrays if k not in PROBE_KEYS]
    if unknown:
        hints = [f"{k!r} -> {g!r}" for k in unknown if (g := _guess(k, arrays[k])) is not None]
        names = ", ".join(map(repr, unknown))
        probably = f" (probably {', '.join(hints)})" if hints else ""
        return f"unknown array{'s' if len(unknown) > 1 else ''} {names}{probably}: rename or drop the others"
    if "inputs" not in arrays:
        return "no 'inputs' array: store the model inputs under the name 'inputs'"
    if "labels" in arrays and "targets" in arrays:
        return "both 'labels' and 'targets': keep exactly one of 'labels' or 'targets' (the one the loss uses)"
    if "labels" not in arrays and "targets" not in arrays:
        return "neither 'labels' nor 'targets': store exactly one of 'labels' or 'targets'"
    return None


def _guess(key: str, arr: np.ndarray) -> str | None:
    """The probe key an unknown name probably means (``y`` of floats: ``targets``)."""
    guess = _ALIASES.get(key.lower())
    if guess == "labels" and np.asarray(arr).dtype.kind == "f":
        return "targets"
    return guess


def _validate(arrays: Mapping[str, np.ndarray], path: Path | None) -> None:
    summary = probe_summary(arrays)
    problem = _key_problem(arrays)
    if problem is not None:
        held = ", ".join(f"{k!r} {tuple(v.shape)} {_dtype_name(v)}" for k, v in arrays.items())
        raise ProbeError(
            f"{_where(path)} holds {held or 'no arrays'}: {problem}; a probe file holds {_EXPECTED}"
        )
    validator = jsonschema.Draft202012Validator(_schema())
    problems = []
    for err in sorted(validator.iter_errors(summary), key=lambda e: list(e.absolute_path)):
        fix = _fix_hint(err)
        where = "/".join(str(p) for p in err.absolute_path)
        # Messages about a whole object or list repeat the instance; the hint says it better.
        detail = err.message if fix is None or not isinstance(err.instance, dict | list) else ""
        text = "; ".join(t for t in (detail, f"fix: {fix}" if fix else "") if t)
        problems.append(f"{where}: {text}" if where else text)
    if problems:
        raise ProbeError(
            f"{_where(path)} does not match the probe schema (holds {summary['keys']} "
            f"with shapes {summary['shapes']} and dtypes {summary['dtypes']}): "
            + "; ".join(problems)
        )
    n = summary["n_samples"]
    wrong = {k: v.shape[0] for k, v in arrays.items() if v.shape[0] != n}
    if wrong:
        raise ProbeError(
            f"{_where(path)}: arrays disagree on the number of samples: 'inputs' has {n} but "
            + ", ".join(f"{k!r} has {m}" for k, m in wrong.items())
            + "; every array needs one row per probe sample"
        )
    for key in ("inputs", "targets"):
        arr = arrays.get(key)
        if arr is not None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise ProbeError(
                f"{_where(path)}: {key!r} holds {bad} NaN or infinite values; "
                "remove or impute them before capture"
            )
    labels = arrays.get("labels")
    if labels is not None and labels.size and labels.min() < 0:
        raise ProbeError(
            f"{_where(path)}: 'labels' holds negative values (min {int(labels.min())}); "
            "labels must be class indices 0..C-1 (drop ignored positions from the probe set)"
        )
    sample_id = arrays.get("sample_id")
    if sample_id is not None and len(np.unique(sample_id)) != len(sample_id):
        raise ProbeError(f"{_where(path)}: 'sample_id' holds duplicate ids; ids must be unique")


def _fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in PROBE_KEYS:
        arr = arrays.get(key)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        digest.update(key.encode())
        digest.update(arr.dtype.str.encode())
        digest.update(repr(tuple(arr.shape)).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def make_probe(
    inputs: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    sample_id: np.ndarray | None = None,
    path: str | Path | None = None,
) -> ProbeSet:
    """Validate in-memory arrays and build a :class:`ProbeSet`.

    Parameters
    ----------
    inputs : numpy.ndarray
        Model inputs, ``(n_samples, ...)``.
    labels, targets : numpy.ndarray, optional
        Exactly one: integer class indices or real-valued targets.
    sample_id : numpy.ndarray, optional
        One unique id per sample.
    path : str or pathlib.Path, optional
        The file the arrays came from (used in messages and recorded).

    Returns
    -------
    ProbeSet

    Raises
    ------
    ProbeError
        If the arrays do not form a valid probe set; the message says what to fix.
    """
    given = {"inputs": inputs, "labels": labels, "targets": targets, "sample_id": sample_id}
    arrays = {k: np.asarray(v) for k, v in given.items() if v is not None}
    return _build(arrays, Path(path) if path is not None else None)


def _build(arrays: dict[str, np.ndarray], path: Path | None) -> ProbeSet:
    _validate(arrays, path)
    return ProbeSet(
        inputs=arrays["inputs"],
        labels=arrays.get("labels"),
        targets=arrays.get("targets"),
        sample_id=arrays.get("sample_id"),
        fingerprint=_fingerprint(arrays),
        path=path,
    )


def _torch_to_numpy(name: str, value: Any, path: Path) -> np.ndarray:
    import torch

    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        raise ProbeError(
            f"probe file {str(path)!r}: entry {name!r} is a {type(value).__name__}, not a tensor; "
            "save a dict of tensors (torch.save({'inputs': x, 'labels': y}, path))"
        )
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as err:
        raise ProbeError(
            f"probe file {str(path)!r} could not be read without pickle ({err}); "
            "save plain numeric arrays (no object arrays) with numpy.savez"
        ) from err
    except (OSError, EOFError) as err:
        raise ProbeError(f"probe file {str(path)!r} is not a readable .npz archive: {err}") from err


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ProbeError(
            f"probe file {str(path)!r} is not a readable safetensors file: {err}"
        ) from err
    return {k: _torch_to_numpy(k, v, path) for k, v in tensors.items()}


def _read_pt(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"probe file {str(path)!r} needs arbitrary unpickling to load, which gramlin-analyze "
            "refuses; save a plain dict of tensors, or convert it to .npz or .safetensors"
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise ProbeError(f"probe file {str(path)!r} is not a readable torch file: {err}") from err
    if not isinstance(obj, Mapping):
        raise ProbeError(
            f"probe file {str(path)!r} holds a {type(obj).__name__}, not a dict; "
            "save a dict such as {'inputs': x, 'labels': y}"
        )
    return {str(k): _torch_to_numpy(str(k), v, path) for k, v in obj.items()}


_READERS = {
    ".npz": _read_npz,
    ".safetensors": _read_safetensors,
    ".pt": _read_pt,
    ".pth": _read_pt,
}


def load_probe(path: str | Path, *, storage_options: dict | None = None) -> ProbeSet:
    """Read and validate a probe-set file.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.npz``, ``.safetensors``, ``.pt`` or ``.pth`` file holding
        ``inputs``, exactly one of ``labels``/``targets``, and optionally
        ``sample_id``; or an fsspec URL of one (``s3://bucket/probe.npz``).
    storage_options : dict, optional
        fsspec options of a URL (credentials, endpoint); without them fsspec's
        defaults apply (its configuration, the cloud SDK's environment variables).

    Returns
    -------
    ProbeSet

    Raises
    ------
    ProbeError
        If the file is missing, unreadable, or its arrays do not form a valid
        probe set (the message names the file and what to change).
    UnsafeCheckpointError
        If a ``.pt`` file needs arbitrary unpickling.
    """
    if is_url(path):
        remote = RemotePath(str(path), storage_options)
        return _load_remote(remote, _reader_for(remote, "URL"))
    path = Path(path)
    return _build(_reader_for(path, "path")(path), path)


def _reader_for(path: Path | RemotePath, what: str):
    """The reader of the probe file ``path``, which must exist (``what``: path or URL)."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ProbeError(
            f"probe file {str(path)!r} has unsupported suffix {path.suffix!r}; "
            f"save it as one of {sorted(_READERS)}"
        )
    if not path.is_file():
        raise ProbeError(f"probe file {str(path)!r} does not exist (check the --probe {what})")
    return reader


def _load_remote(remote: RemotePath, reader) -> ProbeSet:
    """A probe set behind a URL: fetched whole (a probe is read whole anyway) into a
    temporary file the local readers open; messages name the URL."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gramlin-probe-") as tmp:
        local = Path(tmp) / remote.name
        local.write_bytes(remote.read_bytes())
        try:
            arrays = reader(local)
        except ProbeError as err:
            raise ProbeError(str(err).replace(str(local), str(remote))) from err
    # Messages and ProbeSet.path name the URL (RemotePath has the Path operations used).
    return _build(arrays, cast(Path, remote))


_probes: dict[tuple[str, int, int], ProbeSet] = {}
_probe_lock = threading.Lock()


def cached_probe(path: str | os.PathLike) -> ProbeSet:
    """:func:`load_probe`, kept for the file's current version (path, size, mtime).

    The driver reads the probe to check it and to store it, and every task of
    the process runs it: one read and one validation instead of one each.
    """
    try:
        st = os.stat(path)
    except OSError:
        return load_probe(path)  # its error names the file and what to do
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _probe_lock:
        if key not in _probes:
            _probes.clear()
            _probes[key] = load_probe(path)
        return _probes[key]
