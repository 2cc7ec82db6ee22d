"""The step axis shared by every group: appending steps, inserting them, dropping them.

Rows whose status is ``ok`` keep their data: it is moved to the new position
when steps are inserted before it. A moved row is marked ``pending`` before
its data moves and ``ok`` only after, so a kill at any moment leaves no ``ok``
row pointing at the wrong data. A writer killed while resizing leaves arrays
of two lengths; the next one first gives every array the manifest's length
again (:func:`_repair_lengths`), then changes the axis as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from gramlin_analyze.errors import UsageError
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import (
    _resize_and_write,
    resize_all,
    same_values,
    v3_metadata,
    write_all,
)
from gramlin_analyze.store.metrics import INPUTS

if TYPE_CHECKING:
    from gramlin_analyze.store.core import GramlinStore

__all__ = ["set_step_axis"]

#: Arrays up to this size are permuted in memory; larger ones row by row.
_BIG_MOVE_BYTES = 64 * 2**20


def set_step_axis(
    gs: GramlinStore, new_steps: np.ndarray, rows: dict[int, dict[str, Any]] | None = None
) -> dict[int, int]:
    """Make ``new_steps`` (sorted, unique) the step axis of every group of ``gs``.

    ``rows`` gives manifest fields by step (as ``write_rows``); fields of new
    steps are written with the axis when steps are only appended (an
    incremental ingest), the others after it. Returns ``{step: index}``.
    """
    new_steps = np.asarray(new_steps, dtype=np.int64)
    rows = dict(rows or {})
    if np.any(np.diff(new_steps) <= 0):
        raise UsageError("steps must be sorted and unique")
    pos = {int(s): i for i, s in enumerate(new_steps)}
    man = gs.manifest()
    same = len(man["step"]) == len(new_steps) and np.array_equal(man["step"], new_steps)
    if not same or gs._interrupted:
        _change_axis(gs, man, new_steps, pos, rows)
    gs.write_row_fields(
        [(pos[step], fields) for step, fields in rows.items()]
    )  # what the axis did not take
    return pos


def _change_axis(
    gs: GramlinStore, man: dict, new_steps: np.ndarray, pos: dict[int, int], rows: dict
) -> None:
    """Resize and rewrite every step-major array; the ``rows`` written are removed from ``rows``."""
    old_steps, status = man["step"], man["status"]
    n_old, n_new = len(old_steps), len(new_steps)
    moves = {
        i: pos[int(s)]
        for i, (s, st) in enumerate(zip(old_steps, status, strict=True))
        if st == "ok" and int(s) in pos and pos[int(s)] != i
    }
    nodes = gs._walk()  # before marking: from the consolidated copy while it is current
    gs.structure_changed()
    gs._man = None  # rewritten below
    step_arrays, step_coords = _step_nodes(nodes)
    repaired = gs._interrupted
    if repaired:
        _repair_lengths([*step_arrays.values(), *step_coords], n_old)
        gs._interrupted = False
    manifest_paths = {f"{L.STEPS}/{k}" for k in L.MANIFEST}
    # The hashes of /metrics results move after every result: a kill between leaves no
    # hash vouching for a result that is not in its place (it is recomputed instead).
    provenance = f"{L.METRICS}/{INPUTS}/"
    data_arrays = [
        arr
        for path, arr in sorted(step_arrays.items(), key=lambda kv: kv[0].startswith(provenance))
        if path not in manifest_paths
    ]
    g = {name: step_arrays[f"{L.STEPS}/{name}"] for name in L.MANIFEST}
    new_man = _permuted_manifest(man, new_steps, pos)
    final_status = new_man["status"].copy()
    for j in moves.values():
        new_man["status"][j] = "pending"
    if not moves and n_new > n_old and np.array_equal(new_steps[:n_old], old_steps):
        stored = None if repaired else man
        _append(rows, pos, n_old, data_arrays, g, step_coords, new_man, new_steps, stored)
    else:
        _rearrange(
            moves,
            status,
            n_old,
            n_new,
            data_arrays,
            g,
            step_coords,
            new_man,
            final_status,
            new_steps,
        )
        new_man["status"] = final_status
    gs._man = {"step": new_steps.copy(), **new_man}
    gs.consolidate()


def _repair_lengths(arrays: list[zarr.Array], n: int) -> None:
    """The last writer stopped while resizing: give every array the manifest's length again."""
    resize_all([(a, (n, *a.shape[1:])) for a in arrays if a.shape[0] != n])


def _permuted_manifest(
    man: dict, new_steps: np.ndarray, pos: dict[int, int]
) -> dict[str, np.ndarray]:
    """The manifest columns on the new axis: kept rows in their new places, new rows pending."""
    n_new = len(new_steps)
    keep = {
        pos[int(s)]: i
        for i, s in enumerate(man["step"])
        if int(s) in pos and man["status"][i] != ""
    }
    new_man: dict[str, np.ndarray] = {}
    for name, (dtype, fill, _, _) in L.MANIFEST.items():
        old = man.get(name)
        col = (
            np.full(n_new, "", dtype=object)
            if dtype is str
            else np.full(n_new, fill, dtype=np.dtype(dtype))
        )
        if old is not None:
            for j, i in keep.items():
                col[j] = old[i]
        new_man[name] = col
    for j in range(n_new):
        if j not in keep:
            new_man["status"][j] = "pending"
    return new_man


def _append(rows, pos, n_old, data_arrays, g, step_coords, new_man, new_steps, stored) -> None:
    """Steps appended: old rows keep their place and values, new rows are unset ("" status:
    not ok) until written, so no order is needed for safety; every array is resized and
    rewritten in one batch, with the given fields of the new rows (never ok here).

    A column whose old rows are as ``stored`` and whose new rows are all its
    fill value is only resized: its chunk already holds them (zarr writes
    whole chunks, padded with the fill value, and a shrink resets dropped
    rows), and on an object store each column written is a request. After a
    repair (``stored`` None) every column is written.
    """
    from gramlin_analyze.store.core import _coerce

    for step in [
        st for st in rows if pos[st] >= n_old and rows[st].get("status", "pending") != "ok"
    ]:
        for name, v in rows.pop(step).items():
            if name not in L.MANIFEST:
                raise KeyError(f"unknown manifest field {name!r}")
            new_man[name][pos[step]] = _coerce(name, v)
    n_new = len(new_steps)

    def value(name: str, col: np.ndarray) -> np.ndarray | None:
        if stored is None or name not in stored or not same_values(col[:n_old], stored[name]):
            return col
        fill = "" if col.dtype == object else L.MANIFEST[name][1]
        tail = col[n_old:]
        unset = np.all(np.isnan(tail)) if isinstance(fill, float) else np.all(tail == fill)
        return None if unset else col

    _resize_and_write(
        [(arr, (n_new, *arr.shape[1:]), None) for arr in data_arrays]
        + [(g[name], (n_new,), value(name, col)) for name, col in new_man.items()]
        + [(c, (n_new,), new_steps) for c in step_coords]
    )


def _rearrange(
    moves, status, n_old, n_new, data_arrays, g, step_coords, new_man, final_status, new_steps
) -> None:
    """Steps inserted or dropped: moved rows pending first, data moved, then every column
    but status, then status, then the coordinates, and moved rows ok last."""
    if moves:
        st = np.asarray(status, dtype=object).copy()
        st[list(moves)] = "pending"
        write_all([(g["status"], st)])
    if n_new > n_old:
        resize_all([(arr, (n_new, *arr.shape[1:])) for arr in data_arrays])
    for arr in data_arrays:
        _move_rows(arr, moves)
    resize_all([(g[name], (n_new,)) for name in new_man] + [(c, (n_new,)) for c in step_coords])
    write_all([(g[name], col) for name, col in new_man.items() if name != "status"])
    write_all([(g["status"], new_man["status"])])
    write_all([(c, new_steps) for c in step_coords])
    if moves:
        write_all([(g["status"], final_status)])
    if n_new < n_old:
        resize_all([(arr, (n_new, *arr.shape[1:])) for arr in data_arrays])


def _step_nodes(
    nodes: dict[str, zarr.Array | zarr.Group],
) -> tuple[dict[str, zarr.Array], list[zarr.Array]]:
    """Every array whose first dim is ``step`` by path, and every ``step`` coordinate.

    The handles are resized in place, so they stay valid through :func:`set_step_axis`.
    """
    arrays: dict[str, zarr.Array] = {}
    coords: list[zarr.Array] = []
    for path, node in nodes.items():
        if not isinstance(node, zarr.Array):
            continue
        if path.rsplit("/", 1)[-1] == "step":
            coords.append(node)
        elif (v3_metadata(node).dimension_names or ())[:1] == ("step",):
            arrays[path] = node
    return arrays, coords


def _move_rows(arr: zarr.Array, moves: dict[int, int]) -> None:
    if not moves:
        return
    if arr.nbytes <= _BIG_MOVE_BYTES:
        data = cast(np.ndarray, arr[:])
        out = data.copy()
        for i, j in moves.items():
            out[j] = data[i]
        arr[:] = out
        return
    up = sorted((i for i, j in moves.items() if j > i), reverse=True)
    down = sorted(i for i, j in moves.items() if j < i)
    for i in up + down:
        arr[moves[i]] = arr[i]
