"""The Gram matrix against the *recorded* VCS sum (``gramlin_analyze.record``), beside the
trapezoid estimate from checkpoints.

The record holds the VCS summed over every optimizer step, each on its own batch (the
paper's Fig. 7); the trapezoid estimate (``gram_vcs_acc_corr``, ``vcs_interval_corr``) stands
in for it from the probe-set VCS at the checkpoints. Both go to ``/metrics`` as
``(step, layer)`` scalars, each with a ``vcs_source`` attribute saying which one it used.

Record counts are used, never the store's step numbers: a checkpoint's step (``global_step``,
a name) need not equal the optimizer steps the record summed. An interval whose record count
goes down (training restarted without resuming the record) gets NaN.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.analysis.metrics import FAMILIES
from gramlin_analyze.reducers.alignment import pearson_np
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.chunks import group_at
from gramlin_analyze.store.metrics import MetricsSpec, declare_metrics

if TYPE_CHECKING:
    from gramlin_analyze.store import GramlinStore

__all__ = ["RECORDED_METRICS", "TRAPEZOID_METRICS", "analyze_recorded", "recorded_rows"]

_SOURCE = "recorded: " + L.RECORDED_SOURCE

#: The metrics from the record: name -> long_name.
RECORDED_METRICS: dict[str, str] = {
    "gram_vcs_recorded_corr": "diag Pearson of W_t^T W_t and the recorded VCS sum (paper Fig. 7)",
    "gram_vcs_recorded_corr_full": "full Pearson of W_t^T W_t and the recorded VCS sum (full-mode layers)",
    "dgram_vcs_recorded_corr": (
        "diag Pearson of W_t^T W_t - W_0^T W_0 and the recorded VCS summed since step 0 "
        "(the first recorded checkpoint)"
    ),
    "dgram_vcs_recorded_corr_full": (
        "full Pearson of W_t^T W_t - W_0^T W_0 and the recorded VCS sum since step 0 (full-mode layers)"
    ),
    "vcs_recorded_interval_corr": (
        "Pearson of W_b^T W_b - W_a^T W_a and the recorded VCS of the interval (a, b] "
        "(full-mode layers: all entries; diag-mode: the diagonal)"
    ),
    "vcs_recorded_interval_ratio": "||recorded VCS of (a, b]|| / ||W_b^T W_b - W_a^T W_a|| (same entries)",
    "vcs_recorded_second_share": (
        "||second-order part|| / (||first-order part|| + ||second-order part||) of the recorded "
        "VCS of the interval (a, b]"
    ),
}

#: The checkpoint-estimate metrics of the ``vc`` family (its trajectory scalars but the FLE
#: residual's), labelled with their source here.
TRAPEZOID_METRICS = tuple(n for n in FAMILIES["vc"].phase2_scalars if not n.startswith("fle_"))
_TRAPEZOID_SOURCE = (
    "trapezoid estimate: (b - a)(VCS_a + VCS_b)/2 of the probe-set VCS at the checkpoints"
)


@dataclass(frozen=True, slots=True)
class _Row:
    """One recorded checkpoint of a layer: the Gram (or its diagonal) and the record."""

    index: int
    count: int
    gram: np.ndarray
    vcs: np.ndarray
    first: np.ndarray
    second: np.ndarray


def recorded_rows(gs: GramlinStore, layer: str) -> list[int]:
    """Rows of ``layer`` that are ``ok`` and hold a record (``steps_recorded >= 0``), in order."""
    grp: Any = group_at(gs.root, f"{L.LAYERS}/{layer}")
    counts = np.asarray(grp[L.recorded_name("steps")][:])
    status = gs.manifest()["status"]
    return [i for i, st in enumerate(status) if st == "ok" and counts[i] >= 0]


def _read(grp: Any, i: int, full: bool, count: int) -> _Row:
    W = np.asarray(grp["weight"][i], dtype=np.float64)
    gram = W.T @ W if full else np.einsum("oi,oi->i", W, W)
    parts = [np.asarray(grp[L.recorded_name(q)][i]) for q in ("vcs", "vcs_first", "vcs_second")]
    return _Row(i, count, gram, *parts)


def _pearson(a: np.ndarray, b: np.ndarray, full: bool, *, diag: bool) -> float:
    """Pearson of two Grams (full mode) or of two diagonals (diag mode)."""
    if not full:  # diagonals: every entry of a 1 x d matrix
        return float(pearson_np(a[None, :], b[None, :], mode="full"))
    return float(pearson_np(a, b, mode="diag" if diag else "full"))


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a * a)))


def _layer_metrics(gs: GramlinStore, layer: str, n_steps: int) -> dict[str, np.ndarray]:
    """Every recorded metric of one layer, a column of ``n_steps`` (NaN where none)."""
    grp: Any = group_at(gs.root, f"{L.LAYERS}/{layer}")
    full = str(grp[L.recorded_name("vcs")].attrs.get("mode", "full")) == "full"
    out = {name: np.full(n_steps, np.nan) for name in RECORDED_METRICS}
    counts = np.asarray(grp[L.recorded_name("steps")][:])
    base = prev = None
    for i in recorded_rows(gs, layer):
        row = _read(grp, i, full, int(counts[i]))
        out["gram_vcs_recorded_corr"][i] = _pearson(row.gram, row.vcs, full, diag=True)
        if full:
            out["gram_vcs_recorded_corr_full"][i] = _pearson(row.gram, row.vcs, full, diag=False)
        if base is None:
            base = row
        elif row.count >= base.count:
            dg, dv = row.gram - base.gram, row.vcs - base.vcs
            out["dgram_vcs_recorded_corr"][i] = _pearson(dg, dv, full, diag=True)
            if full:
                out["dgram_vcs_recorded_corr_full"][i] = _pearson(dg, dv, full, diag=False)
        if prev is not None and row.count >= prev.count:
            _interval(out, prev, row, full)
        prev = row
    return out


def _interval(out: dict[str, np.ndarray], a: _Row, b: _Row, full: bool) -> None:
    """Interval consistency and second-order share of ``(a, b]``, at ``b``'s row."""
    dg, dv = b.gram - a.gram, b.vcs - a.vcs
    i = b.index
    out["vcs_recorded_interval_corr"][i] = _pearson(dg, dv, full, diag=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["vcs_recorded_interval_ratio"][i] = np.float64(_norm(dv)) / _norm(dg)
        n1, n2 = _norm(b.first - a.first), _norm(b.second - a.second)
        out["vcs_recorded_second_share"][i] = np.float64(n2) / (n1 + n2)


def analyze_recorded(gs: GramlinStore, *, layers: list[str] | None = None) -> list[str]:
    """Compute the recorded metrics of every layer with a record (matching the ``layers``
    globs) into ``/metrics``; returns the layers done (none: nothing is written)."""
    names = [n for n in gs.layer_names() if L.recorded_name("vcs") in gs.layer(n)]
    if layers:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in layers)]
    if not names:
        return []
    scalars = {
        name: {"long_name": doc, "vcs_source": _SOURCE} for name, doc in RECORDED_METRICS.items()
    }
    declare_metrics(gs, MetricsSpec(scalars=scalars))
    m: Any = group_at(gs.root, L.METRICS)
    index = {str(n): j for j, n in enumerate(m["layer"][:])}
    n_steps = len(gs.steps())
    columns = {name: _layer_metrics(gs, name, n_steps) for name in names if name in index}
    for metric in RECORDED_METRICS:
        arr = m[metric]
        values = np.asarray(arr[:], dtype=np.float64)
        for name, col in columns.items():
            values[:, index[name]] = col[metric]
        arr[:] = values
    _label_trapezoid(gs, m)
    gs.ensure_consolidated()
    return list(columns)


def _label_trapezoid(gs: GramlinStore, m: Any) -> None:
    """Say on the trapezoid metrics that they are estimates (once)."""
    todo = [n for n in TRAPEZOID_METRICS if n in m and "vcs_source" not in m[n].attrs]
    if todo:
        gs.structure_changed()
        for n in todo:
            group_at(gs.root, L.METRICS)[n].attrs.update({"vcs_source": _TRAPEZOID_SOURCE})
