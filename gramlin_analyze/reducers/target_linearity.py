"""Target Linearity (TL), its null baseline, and the TL surrogate / kernel-target alignment.

``TL_lambda(H, Y) = 1 - ||Y_c - H B||_F^2 / ||Y_c||_F^2`` with
``B = (H^T H + lambda I)^+ H^T Y_c``: the pooled R^2 of a linear (ridge)
regression of the column-centered targets on the layer input ``H`` (uncentered,
no intercept by default, as in the paper).

Everything is computed from float64 sufficient statistics summed over sample
blocks in one pass: ``N``, ``sum H``, ``sum Y``, ``H^T H``, ``H^T Y`` and
``Y^T Y``. Centering of the targets (and, as an option, of the features) is an
algebraic correction of those sums, e.g. ``H^T Y_c = H^T Y - (sum H)(sum Y)^T / N``;
the ``N x N`` kernel is never formed.

Inputs: features ``h`` with dims ``(..., "sample", "in")``; either integer
class ``labels`` with dims ``("sample",)`` (``C`` classes: the one-hot targets'
statistics come from per-class sums of ``h`` and the class counts, the ``N x C``
one-hot matrix is never built) or real ``targets`` with dims ``("sample", "target")``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    STAT_DIM,
    FloatArray,
    apply,
    as_float64,
    batch_bad,
    layout_size,
    pack,
    poison,
    quiet,
    require_dims,
    resolve_targets,
    stream_sum,
    sym,
    unpack,
    xr,
)
from gramlin_analyze.reducers._labels import class_counts_np, class_index_np, class_sums_np
from gramlin_analyze.reducers._tl_solve import (
    centered_targets,
    finite_stats,
    normal_equations,
    pca_project,
    residual_sum_of_squares,
    stat_core,
    target_trace,
)

__all__ = [
    "tl_stats_np",
    "tl_label_stats_np",
    "tl_layout",
    "target_linearity_from_stats_np",
    "target_linearity_np",
    "target_linearity",
    "tl_null",
]


def tl_layout(d: int, c: int, *, labels: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """How TL's statistics are packed: ``d`` features, ``c`` targets or classes
    (class labels keep the diagonal of ``Y^T Y`` only)."""
    yy = ("yy_diag", (c,)) if labels else ("yy", (c, c))
    return [("n", (1,)), ("sum_h", (d,)), ("sum_y", (c,)), ("hh", (d, d)), ("hy", (d, c)), yy]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


@quiet
def tl_stats_np(
    h: npt.ArrayLike, y: npt.ArrayLike, *, hh: FloatArray | None = None
) -> dict[str, FloatArray]:
    """Additive sufficient statistics of TL over the sample axis.

    Parameters
    ----------
    h : array_like, shape (..., n_samples, d)
        Features (layer inputs).
    y : array_like, shape (..., n_samples, c)
        Targets (one-hot labels or real targets), not centered.
    hh : numpy.ndarray, optional
        ``sym(h^T h)`` of these rows when the caller already has it.

    Returns
    -------
    dict of numpy.ndarray
        ``n`` (..., 1), ``sum_h`` (..., d), ``sum_y`` (..., c), ``hh = H^T H``
        (..., d, d), ``hy = H^T Y`` (..., d, c), ``yy = Y^T Y`` (..., c, c).
        Summing the statistics of sample blocks gives those of their union.
        All NaN for a batch entry with a NaN/Inf.

    Examples
    --------
    >>> s = tl_stats_np([[1.0], [2.0]], [[0.0], [1.0]])
    >>> float(s["n"][0]), s["hy"]
    (2.0, array([[2.]]))
    """
    h, y = as_float64(h), as_float64(y)
    lead = np.broadcast_shapes(h.shape[:-2], y.shape[:-2])
    bad = np.broadcast_to(batch_bad(h, 2) | batch_bad(y, 2), lead)
    parts = {
        "n": np.full(lead + (1,), float(h.shape[-2])),
        "sum_h": h.sum(axis=-2),
        "sum_y": y.sum(axis=-2),
        "hh": sym(_t(h) @ h) if hh is None else hh,
        "hy": _t(h) @ y,
        "yy": sym(_t(y) @ y),
    }
    out = {}
    for name, value in parts.items():
        core = stat_core(name)
        full = np.array(np.broadcast_to(value, lead + value.shape[value.ndim - core :]))
        out[name] = poison(full, bad, core)
    return out


@quiet
def tl_label_stats_np(
    h: npt.ArrayLike, labels: npt.ArrayLike, n_classes: int, *, hh: FloatArray | None = None
) -> dict[str, FloatArray]:
    """:func:`tl_stats_np` for one-hot targets of integer class labels, without the one-hot.

    ``H^T Y`` is the per-class sums of the rows of ``h``, ``sum Y`` the class
    counts, and ``Y^T Y`` (diagonal) is kept as its diagonal ``yy_diag``: memory
    and time do not grow with ``N x C``.

    Parameters
    ----------
    h : array_like, shape (..., n_samples, d)
    labels : array_like, shape (..., n_samples)
        Classes in ``[0, n_classes)``; an invalid label makes its batch entry NaN.
    n_classes : int
    hh : numpy.ndarray, optional
        ``sym(h^T h)`` of these rows when the caller already has it.

    Returns
    -------
    dict of numpy.ndarray
        ``n``, ``sum_h``, ``sum_y`` (..., C), ``hh``, ``hy`` (..., d, C) and
        ``yy_diag`` (..., C); summable over sample blocks like :func:`tl_stats_np`'s.

    Examples
    --------
    >>> s = tl_label_stats_np([[1.0], [2.0], [4.0]], [0, 1, 1], 2)
    >>> s["hy"], s["yy_diag"]
    (array([[1., 6.]]), array([1., 2.]))
    """
    h = as_float64(h)
    index, valid = class_index_np(labels, int(n_classes))
    lead = np.broadcast_shapes(h.shape[:-2], index.shape[:-1])
    bad = np.broadcast_to(batch_bad(h, 2) | ~np.all(valid, axis=-1), lead)
    counts = class_counts_np(np.broadcast_to(index, lead + index.shape[-1:]), int(n_classes))
    parts = {
        "n": np.full(lead + (1,), float(h.shape[-2])),
        "sum_h": h.sum(axis=-2),
        "sum_y": counts,
        "hh": sym(_t(h) @ h) if hh is None else hh,
        "hy": np.ascontiguousarray(_t(class_sums_np(h, index, int(n_classes)))),
        "yy_diag": counts.copy(),
    }
    out = {}
    for name, value in parts.items():
        core = stat_core(name)
        full = np.array(np.broadcast_to(value, lead + value.shape[value.ndim - core :]))
        out[name] = poison(full, bad, core)
    return out


@quiet
def target_linearity_from_stats_np(
    stats: Mapping[str, npt.ArrayLike],
    *,
    lam: float = 0.0,
    center_features: bool = False,
    intercept: bool = False,
    pca_components: int | None = None,
    rcond: float | None = None,
) -> FloatArray:
    """TL from the summed statistics of :func:`tl_stats_np`.

    ``RSS = ||Y_c||^2 - 2 tr(B^T H^T Y_c) + tr(B^T H^T H B)`` with
    ``B = (H^T H + lambda I)^+ H^T Y_c``. The system is Jacobi-scaled (unit
    diagonal) and solved by ``eigh`` with eigenvalues below
    ``rcond * max eigenvalue`` treated as zero: a pseudo-inverse for
    rank-deficient ``H^T H`` (e.g. features that are linear combinations of
    others, or ``d >= N``), never an added jitter.

    Parameters
    ----------
    stats : mapping
        ``n, sum_h, sum_y, hh, hy, yy`` (or ``yy_diag`` from
        :func:`tl_label_stats_np`) with shared leading (batch) axes.
    lam : float
        Ridge penalty ``lambda >= 0`` (on the feature weights, not the intercept).
    center_features : bool
        Regress on ``H`` minus its column means.
    intercept : bool
        Append an unpenalized constant feature. With centered targets this
        gives the same TL as ``center_features``.
    pca_components : int, optional
        Replace ``H`` by ``H P`` with ``P`` its top principal axes (of the
        centered features) before the regression, as the paper's code does
        for wide layers.
    rcond : float, optional
        Relative eigenvalue cutoff; default ``10 * d * eps``.

    Returns
    -------
    numpy.ndarray
        TL per batch entry; NaN when ``||Y_c|| = 0`` or a statistic is NaN/Inf.
        Not clipped: round-off may put it a few ulps outside ``[0, 1]``.

    Examples
    --------
    >>> h = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]]
    >>> y = [[1.0], [0.0], [1.0], [2.0]]
    >>> round(float(target_linearity_from_stats_np(tl_stats_np(h, y))), 6)
    0.763158
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    s, bad, n = finite_stats(stats)
    hh, sh, hy = s["hh"], s["sum_h"], s["hy"]
    if pca_components is not None and pca_components < hh.shape[-1]:
        hh, sh, hy = pca_project(hh, sh, hy, n, int(pca_components))
    b, tss = centered_targets(s["sum_y"], target_trace(s), sh, hy, n)
    a, m, b = normal_equations(
        hh, sh, b, n, lam=lam, center_features=center_features, intercept=intercept
    )
    rss = residual_sum_of_squares(a, m, b, tss, rcond)
    tl = 1.0 - rss / tss
    return np.where(bad, np.nan, tl)


def target_linearity_np(
    h: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    lam: float = 0.0,
    center_features: bool = False,
    intercept: bool = False,
    pca_components: int | None = None,
    rcond: float | None = None,
) -> FloatArray:
    """TL of features ``h`` (..., n, d) for targets ``y`` (..., n, c) in one call.

    Same options as :func:`target_linearity_from_stats_np`.

    Parameters
    ----------
    h : array_like, shape (..., n_samples, d)
    y : array_like, shape (..., n_samples, c)
        Targets, not centered (centering is part of TL).

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> round(float(target_linearity_np([[1.0], [2.0], [3.0]], [[0.0], [1.0], [2.0]])), 6)
    0.142857
    """
    return target_linearity_from_stats_np(
        tl_stats_np(h, y),
        lam=lam,
        center_features=center_features,
        intercept=intercept,
        pca_components=pca_components,
        rcond=rcond,
    )


# ----------------------------------------------------------------------------
# xarray wrappers
# ----------------------------------------------------------------------------


def streamed_tl_stats(
    h: xr.DataArray,
    labels: xr.DataArray | None,
    targets: xr.DataArray | None,
    n_classes: int | None,
    sample_dim: Hashable,
    in_dim: Hashable,
    target_dim: Hashable,
) -> tuple[xr.DataArray, list[tuple[str, tuple[int, ...]]]]:
    """TL statistics summed over sample blocks (one pass; one task per Dask chunk).

    Parameters
    ----------
    h, labels, targets, n_classes, sample_dim, in_dim, target_dim
        As in :func:`target_linearity`.

    Returns
    -------
    stats : xarray.DataArray
        Packed statistics over the leading dims of ``h``.
    layout : list of (name, shape)
        How to :func:`~gramlin_analyze.reducers._common.unpack` them.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0], [2.0]], dims=("sample", "in"))
    >>> stats, layout = streamed_tl_stats(
    ...     h, xr.DataArray([0, 1], dims="sample"), None, 2, "sample", "in", "target")
    >>> [name for name, _ in layout], stats.shape
    (['n', 'sum_h', 'sum_y', 'hh', 'hy', 'yy_diag'], (9,))
    """
    require_dims(h, [sample_dim, in_dim], "h")
    y, y_core, c, is_labels = resolve_targets(labels, targets, n_classes, sample_dim, target_dim)
    d = h.sizes[in_dim]
    layout = tl_layout(d, c, labels=is_labels)

    def block(hb: np.ndarray, yb: np.ndarray) -> FloatArray:
        parts = tl_label_stats_np(hb, yb, c) if is_labels else tl_stats_np(hb, yb)
        return pack(parts, layout, parts["n"].shape[:-1])

    stats = stream_sum(
        block, [h, y], reduce_dim=sample_dim, core_dims=[[in_dim], y_core], size=layout_size(layout)
    )
    return stats, layout


def _finalize_tl(
    stats: np.ndarray, layout: list[tuple[str, tuple[int, ...]]], **options: Any
) -> FloatArray:
    return target_linearity_from_stats_np(unpack(as_float64(stats), layout), **options)


def _pca_k(d: int, pca: bool, pca_components: int, pca_cap: int) -> int | None:
    if pca and d > pca_cap:
        return int(pca_components)
    return None


def target_linearity(
    h: xr.DataArray,
    *,
    labels: xr.DataArray | None = None,
    targets: xr.DataArray | None = None,
    n_classes: int | None = None,
    lam: float = 0.0,
    center_features: bool = False,
    intercept: bool = False,
    pca: bool = False,
    pca_components: int = 256,
    pca_cap: int = 1000,
    rcond: float | None = None,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    target_dim: Hashable = "target",
) -> xr.DataArray:
    """Target Linearity of a layer's input features.

    Parameters
    ----------
    h : xarray.DataArray
        Features, dims ``(..., sample_dim, in_dim)``; NumPy or Dask backed
        (chunked along samples: one pass, one task per chunk).
    labels : xarray.DataArray, optional
        Integer class indices, dims ``(sample_dim,)``: one-hot targets with
        ``n_classes`` columns (default ``max(labels) + 1``), never built as a
        matrix. Invalid labels give NaN.
    targets : xarray.DataArray, optional
        Real targets, dims ``(sample_dim, target_dim)`` or ``(sample_dim,)``.
    lam : float
        Ridge penalty (default 0: least squares, pseudo-inverse when rank deficient).
    center_features, intercept : bool
        Regression options (default off: uncentered ``H``, no intercept, the paper's).
    pca : bool
        When True and ``d > pca_cap``, regress on the projection of ``H`` onto
        its top ``pca_components`` principal axes (the paper's code: cap 1000,
        256 components). Recorded in ``attrs``.
    rcond : float, optional
        Relative eigenvalue cutoff of the pseudo-inverse.

    Returns
    -------
    xarray.DataArray
        TL over the leading dims of ``h``, with ``attrs`` recording the
        options and ``tl_null = min(1, d/N)``. Equal to 1 (up to round-off)
        when ``d >= N`` and ``H`` has rank ``N``. NaN for constant targets.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]],
    ...                  dims=("sample", "in"))
    >>> labels = xr.DataArray([0, 1, 1, 0], dims="sample")
    >>> round(float(target_linearity(h, labels=labels)), 6)
    0.907895
    """
    stats, layout = streamed_tl_stats(h, labels, targets, n_classes, sample_dim, in_dim, target_dim)
    d, n = h.sizes[in_dim], h.sizes[sample_dim]
    k = _pca_k(d, pca, pca_components, pca_cap)
    options = dict(
        layout=layout,
        lam=float(lam),
        center_features=bool(center_features),
        intercept=bool(intercept),
        pca_components=k,
        rcond=rcond,
    )
    out = apply(_finalize_tl, stats, input_core_dims=[[STAT_DIM]], kwargs=options)
    out.attrs.update(_tl_attrs(lam, center_features, intercept, k, d, n))
    return out


def _tl_attrs(
    lam: float, center_features: bool, intercept: bool, k: int | None, d: int, n: int
) -> dict[str, Any]:
    """The options a TL result was computed with, and its null baseline."""
    d_eff = d if k is None else min(k, d)
    attrs: dict[str, Any] = dict(
        long_name="target linearity",
        lam=float(lam),
        center_features=int(center_features),
        intercept=int(intercept),
        pca_applied=int(k is not None),
        n_features=int(d_eff),
        n_samples=int(n),
        tl_null=_null(d_eff, n),
    )
    if k is not None:
        attrs["pca_components"] = int(k)
    return attrs


def _null(d: int, n: int) -> float:
    return 1.0 if n == 0 else min(1.0, d / n)


def tl_null(
    h: xr.DataArray,
    *,
    pca: bool = False,
    pca_components: int = 256,
    pca_cap: int = 1000,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
) -> xr.DataArray:
    """Null baseline of TL at ``lambda = 0``: ``min(1, d / N)``.

    Features unrelated to the targets give about ``d/N``. ``d`` counts the
    regression features (after the PCA option, if it applies).

    Parameters
    ----------
    h : xarray.DataArray
        Features, dims ``(..., sample_dim, in_dim)``.
    pca, pca_components, pca_cap
        As in :func:`target_linearity`.

    Returns
    -------
    xarray.DataArray
        A scalar.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> float(tl_null(xr.DataArray(np.ones((10, 3)), dims=("sample", "in"))))
    0.3
    """
    require_dims(h, [sample_dim, in_dim], "h")
    d = h.sizes[in_dim]
    k = _pca_k(d, pca, pca_components, pca_cap)
    d_eff = d if k is None else min(k, d)
    out = xr.DataArray(_null(d_eff, h.sizes[sample_dim]))
    out.attrs["long_name"] = "TL null baseline min(1, d/N)"
    return out
