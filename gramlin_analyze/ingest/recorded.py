"""Training-time records in the store: which layers get ``<q>_recorded`` arrays, and each
step's values (docs/record.md).

A record (``gramlin_analyze.record``) holds running sums since training began; ingest stores
each checkpoint's record in that checkpoint's row, so a step marked ``ok`` has its record
written, or explicitly none (NaN sums, ``steps_recorded = -1``): a missing chunk is never
read as data. Records are read with safetensors' NumPy side: ingest never needs torch for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from gramlin_analyze.errors import CheckpointFormatError, ShapeMismatchError
from gramlin_analyze.store import layout as L
from gramlin_analyze.store import put_step, writable
from gramlin_analyze.store.chunks import create_nodes, group_at

if TYPE_CHECKING:
    from gramlin_analyze.io.discovery import CheckpointSource
    from gramlin_analyze.store import GramlinStore

__all__ = ["RecordedLayer", "plan_recorded", "declare_recorded", "write_recorded", "read_record_np"]

FORMAT = "gramlin-record"


@dataclass(frozen=True, slots=True)
class RecordedLayer:
    """How a layer's record is stored: ``full`` or ``diag``, its width, the sums kept."""

    mode: str
    d_in: int
    quantities: tuple[str, ...]

    def shape(self) -> tuple[int, ...]:
        return (self.d_in, self.d_in) if self.mode == "full" else (self.d_in,)


def _open(path: str | os.PathLike):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointFormatError(
            f"{path}: unreadable gramlin record ({err}); delete it or save it again with "
            "Recorder.save"
        ) from err


def _check_meta(path: str | os.PathLike, meta: dict[str, str] | None) -> dict[str, str]:
    meta = meta or {}
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{path}: named like a gramlin record but its metadata format is "
            f"{meta.get('format')!r}, not {FORMAT!r}; rename or remove it"
        )
    return meta


def read_record_np(
    path: str | os.PathLike, keys: set[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(arrays, metadata)`` of a record file (only ``keys`` when given), as NumPy arrays."""
    with _open(path) as f:
        meta = _check_meta(path, f.metadata())
        names = [k for k in f.keys() if keys is None or k in keys]
        return {k: f.get_tensor(k) for k in names}, meta


def _record_layers(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    with _open(path) as f:
        meta = _check_meta(path, f.metadata())
    return json.loads(meta.get("layers", "{}"))


def plan_recorded(
    gs: GramlinStore,
    sources: list[CheckpointSource],
    template: dict[str, tuple[tuple[int, ...], str, bool]],
) -> dict[str, RecordedLayer]:
    """The recorded layers of this store: as stored, else as the newest record describes the
    store's layers (a record layer of another width than the store's is left out)."""
    stored = _stored_layout(gs)
    if stored:
        return stored
    layers = None
    for s in reversed(sources):  # the newest readable record; an unreadable one fails its step
        if s.record is not None:
            try:
                layers = _record_layers(s.record)
                break
            except CheckpointFormatError:
                continue
    out: dict[str, RecordedLayer] = {}
    for name, info in (layers or {}).items():
        if name not in template:
            continue
        shape = template[name][0]
        d_in = int(np.prod(shape[1:], dtype=np.int64))
        if int(info.get("d_in", -1)) != d_in or info.get("mode") not in ("full", "diag"):
            continue
        qs = tuple(q for q in L.RECORDED_SUMS if q in info.get("quantities", ()))
        out[name] = RecordedLayer(info["mode"], d_in, qs)
    return out


def _stored_layout(gs: GramlinStore) -> dict[str, RecordedLayer]:
    out = {}
    for name in gs.layer_names():
        grp = gs.layer(name)
        vcs = grp.get(L.recorded_name("vcs"))
        if vcs is None:
            continue
        mode = str(vcs.attrs.get("mode", "full"))
        qs = tuple(q for q in L.RECORDED_SUMS if L.recorded_name(q) in grp)
        out[name] = RecordedLayer(mode, int(cast(Any, vcs).shape[-1]), qs)
    return out


def declare_recorded(gs: GramlinStore, layout: dict[str, RecordedLayer]) -> None:
    """Create the recorded arrays the store lacks; rows already ``ok`` get "no record"
    written, so that every ok row has all its chunks (``validate`` checks them)."""
    missing = {n: s for n, s in layout.items() if L.recorded_name("vcs") not in gs.layer(n)}
    if not missing:
        return
    n_steps = len(gs.steps())
    specs = [
        spec
        for name, s in missing.items()
        for spec in L.recorded_array_specs(name, n_steps, s.d_in, s.mode, s.quantities)
    ]
    gs.structure_changed()
    create_nodes(gs.zstore, arrays=specs)
    man = gs.manifest()
    ok = [i for i, st in enumerate(man["status"]) if st == "ok"]
    for name, s in missing.items():
        grp = group_at(gs.root, f"{L.LAYERS}/{name}")
        for i in ok:
            _write_none(grp, i, s)


def _write_none(grp: Any, index: int, spec: RecordedLayer) -> None:
    for q in spec.quantities:
        put_step(writable(grp[L.recorded_name(q)]), index, np.full(spec.shape(), np.nan))
    for q, (_, fill, _) in L.RECORDED_COUNTERS.items():
        writable(grp[L.recorded_name(q)])[index] = fill


def write_recorded(
    layers_grp: Any, index: int, record: str | None, layout: dict[str, RecordedLayer]
) -> None:
    """Write one step's record (or "no record" when ``record`` is None) into row ``index``."""
    if record is None:
        for name, spec in layout.items():
            _write_none(layers_grp[name], index, spec)
        return
    arrays, meta = read_record_np(record)
    rec_layers = json.loads(meta.get("layers", "{}"))
    for name, spec in layout.items():
        grp = layers_grp[name]
        info = rec_layers.get(name)
        if info is None:
            _write_none(grp, index, spec)
            continue
        if info.get("mode") != spec.mode:
            raise ShapeMismatchError(
                f"{record}: layer {name!r} is recorded in mode {info.get('mode')!r}, the store "
                f"holds mode {spec.mode!r}; record every checkpoint of a run with the same mode, "
                "or ingest into a new store"
            )
        for q in spec.quantities:
            a = arrays.get(f"{name}.{q}")
            if a is None:
                a = np.full(spec.shape(), np.nan)
            elif a.shape != spec.shape():
                raise ShapeMismatchError(
                    f"{record}: {name}.{q} has shape {a.shape}, the store expects {spec.shape()}"
                )
            put_step(writable(grp[L.recorded_name(q)]), index, np.asarray(a, dtype=np.float64))
        for q, (_, fill, _) in L.RECORDED_COUNTERS.items():
            v = arrays.get(f"{name}.{q}")
            writable(grp[L.recorded_name(q)])[index] = fill if v is None else v.reshape(-1)[0]
