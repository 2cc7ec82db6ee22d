"""``/metrics``: per-(step, layer) scalars, per-layer matrices, and the inputs' provenance.

```
/metrics            step, layer (coordinates); <scalar> (step, layer)
/metrics/_inputs    <family>[_phase2] (step, layer): hash of each result's inputs
/metrics/<layer>    <matrix> (step, ...) such as gram (step, in_i, in_j)
```

A layer's group has no ``step`` coordinate of its own: it inherits the one of
``/metrics`` (xarray's DataTree), so parent and child can never disagree, not
even while a killed writer's change is half done. Stores written before 0.3
have one; it is kept in step with the others.

The analysis says what it computes (:class:`MetricsSpec`); this module lays
it out. Missing nodes are created in one batch, each with its attributes
(one file per node); a writer killed midway leaves the structure flag set, and
the next one recreates what is missing and rewrites coordinates that do not
hold the manifest's steps or the layer names (:func:`repair_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import array_at, create_nodes, group_at, read_all, write_all

if TYPE_CHECKING:
    from gramlin_analyze.store.core import GramlinStore

__all__ = ["INPUTS", "MatrixSpec", "MetricsSpec", "declare_metrics", "repair_metrics"]

#: The group of ``/metrics`` holding each result's input hashes.
INPUTS = "_inputs"

_DESCRIPTION = {
    "description": "per-(step, layer) measurements; definitions in docs/metrics.md of gramlin-analyze",
    "vcs_accumulated_note": (
        "vcs_accumulated is an estimate: the trapezoid rule over checkpoint intervals "
        "of the probe-set VCS, standing in for the sum over every training batch"
    ),
}
_INPUTS_DESCRIPTION = {"description": "provenance hash of each (step, layer) result's inputs"}


@dataclass(frozen=True)
class MatrixSpec:
    """One per-layer array: its shape and dims after ``step``, dtype and attributes."""

    shape: tuple[int, ...]
    dims: tuple[str, ...]
    dtype: np.dtype
    attrs: dict[str, Any]


@dataclass(frozen=True)
class MetricsSpec:
    """What an analysis writes: scalars by name (their attributes), provenance keys,
    and matrices by layer and name."""

    scalars: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    matrices: dict[str, dict[str, MatrixSpec]] = field(default_factory=dict)


_Nodes = list[tuple[str, dict[str, Any]]]


def _missing_nodes(gs: GramlinStore, spec: MetricsSpec) -> tuple[_Nodes, _Nodes, bool]:
    """The groups and arrays of ``spec`` not in the store, and whether ``layer`` is new."""
    root = gs.view
    n = len(gs.steps())
    groups: _Nodes = []
    arrays: _Nodes = []
    have = _member_names(root, L.METRICS) if L.METRICS in root else None
    new_layer_coord = have is None or "layer" not in have
    if have is None:
        groups.append((L.METRICS, _DESCRIPTION))
        have = set()
    if "step" not in have:
        arrays.append((f"{L.METRICS}/step", L.step_coord_spec(gs.steps())))
    layers = gs.layer_names()
    nl = len(layers) if new_layer_coord else array_at(group_at(root, L.METRICS), "layer").shape[0]
    if new_layer_coord:
        arrays.append((f"{L.METRICS}/layer", _layer_coord_spec(nl)))
    for name, attrs in spec.scalars.items():
        if name not in have:
            arrays.append((f"{L.METRICS}/{name}", _scalar_spec(n, nl, attrs)))
    more = [_missing_inputs(root, spec.inputs, INPUTS in have, n, nl)]
    more += [_missing_matrices(root, k, v, k in have, n) for k, v in spec.matrices.items()]
    for new_groups, new_arrays in more:
        groups += new_groups
        arrays += new_arrays
    return groups, arrays, new_layer_coord


def _member_names(root: zarr.Group, path: str) -> set[str]:
    return {k for k, _ in group_at(root, path).members()}


def _layer_coord_spec(nl: int) -> dict[str, Any]:
    """``/metrics/layer``: variable-length strings, written once the array exists."""
    return dict(
        shape=(nl,),
        dtype=str,
        chunks=(max(nl, 1),),
        dimension_names=["layer"],
        attributes={"long_name": "layer name"},
    )


def _scalar_spec(n: int, nl: int, attrs: dict[str, Any]) -> dict[str, Any]:
    """A ``(step, layer)`` scalar, NaN until computed."""
    return dict(
        shape=(n, nl),
        dtype="float64",
        chunks=(L.MANIFEST_CHUNK, nl),
        dimension_names=["step", "layer"],
        fill_value=np.nan,
        attributes=attrs,
    )


def _missing_inputs(
    root: zarr.Group, keys: tuple[str, ...], exists: bool, n: int, nl: int
) -> tuple[_Nodes, _Nodes]:
    """``/metrics/_inputs`` (unless it ``exists``) and its missing hash arrays."""
    base = f"{L.METRICS}/{INPUTS}"
    present = _member_names(root, base) if exists else set()
    groups: _Nodes = [] if exists else [(base, _INPUTS_DESCRIPTION)]
    arrays: _Nodes = []
    for key in keys:
        if key not in present:
            arrays.append(
                (
                    f"{base}/{key}",
                    dict(
                        shape=(n, nl),
                        dtype=str,
                        chunks=(L.MANIFEST_CHUNK, nl),
                        dimension_names=["step", "layer"],
                    ),
                )
            )
    return groups, arrays


def _missing_matrices(
    root: zarr.Group, layer: str, matrices: dict[str, MatrixSpec], exists: bool, n: int
) -> tuple[_Nodes, _Nodes]:
    """A layer's group under ``/metrics`` (unless it ``exists``) and its missing
    matrices: uncompressed, one chunk file per step."""
    base = f"{L.METRICS}/{layer}"
    present = _member_names(root, base) if exists else set()
    groups: _Nodes = [] if exists else [(base, {})]
    arrays: _Nodes = []
    for name, m in matrices.items():
        if name not in present:
            shape = (n, *m.shape)
            arrays.append(
                (
                    f"{base}/{name}",
                    dict(
                        shape=shape,
                        dtype=m.dtype,
                        chunks=L.matrix_chunks(shape, m.dtype.itemsize),
                        dimension_names=["step", *m.dims],
                        fill_value=np.nan,
                        compressors=None,
                        chunk_key_encoding=L.STEP_CHUNK_KEYS,
                        attributes=m.attrs,
                    ),
                )
            )
    return groups, arrays


def declare_metrics(gs: GramlinStore, spec: MetricsSpec) -> None:
    """Create the ``/metrics`` nodes of ``spec`` that are missing (one batch); the
    consolidated copy is marked stale first and rewritten by the caller."""
    groups, arrays, new_layer_coord = _missing_nodes(gs, spec)
    if not groups and not arrays:
        return
    gs.structure_changed()
    create_nodes(gs.zstore, groups=groups, arrays=arrays)
    if new_layer_coord:  # variable-length strings: created, then written
        layers = gs.layer_names()
        write_all([(array_at(gs.root, f"{L.METRICS}/layer"), np.asarray(layers, dtype=object))])


def repair_metrics(gs: GramlinStore) -> None:
    """Rewrite ``/metrics`` coordinates a killed writer left wrong: every ``step``
    coordinate holds the manifest's steps, ``layer`` names the layers it was made for."""
    root = gs.root
    if L.METRICS not in root:
        return
    steps = gs.steps()
    coords = [
        a
        for _, a in group_at(root, L.METRICS).members(max_depth=None)
        if isinstance(a, zarr.Array) and a.path.rsplit("/", 1)[-1] == "step"
    ]
    wrong = [
        (a, steps)
        for a, v in zip(coords, read_all(coords), strict=True)
        if a.shape == steps.shape and not np.array_equal(v, steps)
    ]
    lay = group_at(root, L.METRICS).get("layer")
    if isinstance(lay, zarr.Array):
        names = [str(v) for v in cast(np.ndarray, lay[:])]
        layers = gs.layer_names()
        if "" in names and len(names) == len(layers):  # created, never written
            wrong.append((lay, np.asarray(layers, dtype=object)))
    write_all(wrong)
