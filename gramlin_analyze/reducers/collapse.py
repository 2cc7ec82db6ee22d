"""Neural collapse (NC1-NC4) of a layer's features with class labels.

Features ``h`` have dims ``(..., "sample", "in")``, labels dims ``("sample",)``
(integer classes in ``[0, C)``). Per class ``c``: count ``n_c`` and mean
``mu_c``; ``mu_G`` is the mean of all samples;
``Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` and
``Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T``.

* NC1 ``= tr(Sigma_W Sigma_B^+) / C``;
* NC2 equinorm ``= std_c / mean_c`` of ``||mu_c - mu_G||`` (population std),
  equiangularity ``= mean_{c < c'} |cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1)|``;
* NC3 ``= || W^T/||W||_F - M/||M||_F ||_F^2`` with ``M = [mu_c - mu_G]`` of
  shape ``(d, C)`` and the readout ``W`` of shape ``(C, d)`` (dims
  ``("out", "in")``): ``W^T`` and ``M`` are both ``(d, C)``;
* NC4 = fraction of samples whose readout prediction ``argmax(W h + b)``
  differs from the nearest class mean ``argmin_c ||h - mu_c||``.

NC1-NC3 come from one pass of additive statistics (counts, per-class sums,
``sum h h^T``); NC4 needs the class means first, then a second pass.
Every class must have at least one sample (otherwise its mean is 0/0 = NaN).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    STAT_DIM,
    FloatArray,
    apply,
    as_float64,
    batch_bad,
    default_rtol,
    layout_size,
    mask_nonfinite,
    pack,
    poison,
    quiet,
    require_dims,
    resolve_targets,
    sanitize,
    stream_sum,
    sym,
    unpack,
    xr,
)
from gramlin_analyze.reducers._labels import class_counts_np, class_index_np, class_sums_np

__all__ = [
    "collapse_stats_np",
    "collapse_from_stats_np",
    "nc3_np",
    "ncc_mismatch_np",
    "class_means",
    "neural_collapse",
]

CLASS_DIM = "class"
_FEATURE_DIM = "_gramlin_feature"  # the readout's and class means' feature dim


def _layout(d: int, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("counts", (c,)), ("class_sums", (c, d)), ("scatter", (d, d))]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


@quiet
def collapse_stats_np(
    h: npt.ArrayLike, labels: npt.ArrayLike, n_classes: int, *, hh: FloatArray | None = None
) -> dict[str, FloatArray]:
    """Additive statistics over the sample axis: counts, per-class sums, ``sum h h^T``.

    Per-class sums by label index (``O(N d)``): no ``N x C`` one-hot matrix.

    Parameters
    ----------
    h : array_like, shape (..., n_samples, d)
    labels : array_like, shape (..., n_samples)
        Integer classes in ``[0, n_classes)``; an invalid label poisons the result.
    hh : numpy.ndarray, optional
        ``sym(h^T h)`` of these rows when the caller already has it (the scatter).

    Returns
    -------
    dict of numpy.ndarray
        ``counts`` (..., C), ``class_sums`` (..., C, d), ``scatter`` (..., d, d).

    Examples
    --------
    >>> s = collapse_stats_np([[1.0], [3.0], [5.0]], [0, 0, 1], 2)
    >>> s["counts"], s["class_sums"].ravel()
    (array([2., 1.]), array([4., 5.]))
    """
    h = as_float64(h)
    index, valid = class_index_np(labels, int(n_classes))
    lead = np.broadcast_shapes(h.shape[:-2], index.shape[:-1])
    bad = np.broadcast_to(batch_bad(h, 2) | ~np.all(valid, axis=-1), lead)
    parts = {
        "counts": class_counts_np(np.broadcast_to(index, lead + index.shape[-1:]), int(n_classes)),
        "class_sums": class_sums_np(h, index, int(n_classes)),
        "scatter": sym(_t(h) @ h) if hh is None else hh,
    }
    core = {"counts": 1, "class_sums": 2, "scatter": 2}
    return {
        k: poison(np.array(np.broadcast_to(v, lead + v.shape[v.ndim - core[k] :])), bad, core[k])
        for k, v in parts.items()
    }


def _means(stats: Mapping[str, FloatArray]) -> tuple[FloatArray, FloatArray, FloatArray]:
    counts = as_float64(stats["counts"])
    sums = as_float64(stats["class_sums"])
    n = counts.sum(axis=-1)
    mu = sums / counts[..., :, None]
    mu_g = sums.sum(axis=-2) / n[..., None]
    return mu, mu_g, n


@quiet
def collapse_from_stats_np(
    stats: Mapping[str, npt.ArrayLike], *, rcond: float | None = None
) -> dict[str, FloatArray]:
    """NC1 and NC2 from the summed statistics of :func:`collapse_stats_np`.

    ``Sigma_B^+`` is an ``eigh`` pseudo-inverse with relative cutoff ``rcond``
    (default ``10 * d * eps``): ``Sigma_B`` has rank at most ``C`` (``C - 1``
    for balanced classes).

    Parameters
    ----------
    stats : mapping
        Summed ``counts``, ``class_sums`` and ``scatter``.
    rcond : float, optional
        Relative cutoff of the pseudo-inverse.

    Returns
    -------
    dict of numpy.ndarray
        ``nc1``, ``nc2_equinorm``, ``nc2_equiangularity`` (NaN for ``C = 1``).

    Examples
    --------
    >>> h = [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]
    >>> out = collapse_from_stats_np(collapse_stats_np(h, [0, 0, 1, 1], 2))
    >>> [round(float(out[k]), 12) for k in ("nc1", "nc2_equinorm", "nc2_equiangularity")]
    [0.0, 0.0, 0.0]
    """
    s = {k: as_float64(v) for k, v in stats.items()}
    mu, mu_g, n = _means(s)
    c = mu.shape[-2]
    counts = s["counts"]
    sigma_w = (s["scatter"] - _t(mu) @ (counts[..., :, None] * mu)) / n[..., None, None]
    m = mu - mu_g[..., None, :]  # (..., C, d): rows mu_c - mu_G
    nc1 = _trace_pinv_between(sym(sigma_w), m, c, rcond) / c
    norms = np.sqrt(np.sum(m * m, axis=-1))
    equinorm = norms.std(axis=-1) / norms.mean(axis=-1)
    cos = (m @ _t(m)) / (norms[..., :, None] * norms[..., None, :])
    iu = np.triu_indices(c, k=1)
    if c > 1:
        angular = np.abs(cos[..., iu[0], iu[1]] + 1.0 / (c - 1)).mean(axis=-1)
    else:
        angular = np.full(nc1.shape, np.nan)
    checked = [(s["counts"], 1), (s["class_sums"], 2), (s["scatter"], 2)]
    return {
        "nc1": mask_nonfinite(nc1, 0, *checked),
        "nc2_equinorm": mask_nonfinite(equinorm, 0, *checked),
        "nc2_equiangularity": mask_nonfinite(angular, 0, *checked),
    }


def _trace_pinv_between(sigma_w: FloatArray, m: FloatArray, c: int, rcond: float | None):
    """``tr(Sigma_W Sigma_B^+)`` with ``Sigma_B = m^T m / C``, from the thin SVD of ``m``.

    ``Sigma_B`` has rank at most ``C``: its eigenpairs are those of the ``C x d``
    matrix ``m`` (``O(C^2 d)``), where an ``eigh`` of ``Sigma_B`` costs ``O(d^3)``.
    The cutoff is ``eigh``'s: ``rcond`` (default ``10 d eps``) of the largest eigenvalue.
    """
    clean, bad = sanitize(m, 2)
    _, s, vt = np.linalg.svd(clean, full_matrices=False)  # s descending
    ev = s * s / c
    tol = (default_rtol(m.shape[-1]) if rcond is None else rcond) * ev[..., :1]
    inv = np.where(ev > tol, 1.0 / np.where(ev > tol, ev, 1.0), 0.0)
    quad = np.sum((vt @ sigma_w) * vt, axis=-1)  # v_k^T Sigma_W v_k
    return poison(np.array(np.sum(inv * quad, axis=-1)), bad, 0)


@quiet
def nc3_np(w: npt.ArrayLike, class_means: npt.ArrayLike, global_mean: npt.ArrayLike) -> FloatArray:
    """NC3 ``|| W^T/||W||_F - M/||M||_F ||_F^2`` (self-duality of the readout).

    Parameters
    ----------
    w : array_like, shape (..., C, d)
        Readout weight (rows = classes).
    class_means : array_like, shape (..., C, d)
    global_mean : array_like, shape (..., d)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> float(nc3_np([[2.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]))
    0.0
    """
    w = as_float64(w)
    mt = as_float64(class_means) - as_float64(global_mean)[..., None, :]  # M^T, (C, d)
    wn = w / np.sqrt(np.sum(w * w, axis=(-2, -1)))[..., None, None]
    mn = mt / np.sqrt(np.sum(mt * mt, axis=(-2, -1)))[..., None, None]
    return mask_nonfinite(np.sum((wn - mn) ** 2, axis=(-2, -1)), 0, (w, 2), (mt, 2))


def _mismatches(h: FloatArray, mu: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    """Number of samples whose readout argmax differs from the nearest class mean."""
    pred = np.argmax(h @ _t(w) + b[..., None, :], axis=-1)
    dist = np.sum(mu * mu, axis=-1)[..., None, :] - 2.0 * h @ _t(mu)
    ncc = np.argmin(dist, axis=-1)
    count = np.sum(pred != ncc, axis=-1).astype(np.float64)
    bad = batch_bad(h, 2) | batch_bad(mu, 2) | batch_bad(w, 2) | batch_bad(b, 1)
    return np.where(bad, np.nan, count)


@quiet
def ncc_mismatch_np(
    h: npt.ArrayLike, class_means: npt.ArrayLike, w: npt.ArrayLike, b: npt.ArrayLike | None = None
) -> FloatArray:
    """NC4: fraction of samples where ``argmax(W h + b)`` differs from the nearest class mean.

    Parameters
    ----------
    h : array_like, shape (..., n_samples, d)
    class_means : array_like, shape (..., C, d)
    w : array_like, shape (..., C, d)
    b : array_like, shape (..., C), optional

    Returns
    -------
    numpy.ndarray, shape (...)
        Fraction in ``[0, 1]``.

    Examples
    --------
    >>> h = [[1.0, 0.0], [0.0, 1.0]]
    >>> float(ncc_mismatch_np(h, [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]))
    1.0
    """
    h, mu, w = as_float64(h), as_float64(class_means), as_float64(w)
    b = np.zeros(w.shape[:-1]) if b is None else as_float64(b)
    return _mismatches(h, mu, w, b) / h.shape[-2]


def _collapse_stats(h, labels, n_classes, sample_dim, in_dim):
    require_dims(h, [sample_dim, in_dim], "h")
    labels, _, c, _ = resolve_targets(labels, None, n_classes, sample_dim, "_unused")
    layout = _layout(h.sizes[in_dim], c)

    def block(hb: np.ndarray, lb: np.ndarray) -> FloatArray:
        parts = collapse_stats_np(hb, lb, c)
        return pack(parts, layout, parts["counts"].shape[:-1])

    stats = stream_sum(
        block,
        [h, labels],
        reduce_dim=sample_dim,
        core_dims=[[in_dim], []],
        size=layout_size(layout),
    )
    return stats, layout, c, labels


def _means_np(stats: np.ndarray, layout) -> tuple[FloatArray, FloatArray]:
    mu, mu_g, _ = _means(unpack(as_float64(stats), layout))
    return mu, mu_g


def class_means(
    h: xr.DataArray,
    labels: xr.DataArray,
    *,
    n_classes: int | None = None,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    class_dim: Hashable = CLASS_DIM,
) -> xr.Dataset:
    """Class means ``mu_c`` (dims ``(..., class, in)``) and global mean ``mu_G``.

    Parameters
    ----------
    h : xarray.DataArray
        Features, dims ``(..., sample_dim, in_dim)``.
    labels : xarray.DataArray
        Integer classes, dims ``(sample_dim,)``.
    n_classes : int, optional
        Default ``max(labels) + 1``.

    Returns
    -------
    xarray.Dataset
        ``class_mean`` (dims ``(..., class_dim, in_dim)``) and ``global_mean``
        (``(..., in_dim)``, the mean of all samples).

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0], [3.0], [5.0]], dims=("sample", "in"))
    >>> class_means(h, xr.DataArray([0, 0, 1], dims="sample")).class_mean.values.ravel()
    array([2., 5.])
    """
    stats, layout, c, _ = _collapse_stats(h, labels, n_classes, sample_dim, in_dim)
    return _class_means(stats, layout, c, in_dim, class_dim)


def _class_means(stats, layout, c, in_dim, class_dim) -> xr.Dataset:
    d = layout[-1][1][0]
    mu, mu_g = apply(
        _means_np,
        stats,
        input_core_dims=[[STAT_DIM]],
        output_core_dims=[[class_dim, in_dim], [in_dim]],
        output_sizes={class_dim: c, in_dim: d},
        kwargs={"layout": layout},
    )
    mu = mu.assign_coords({class_dim: np.arange(c)})
    return xr.Dataset({"class_mean": mu, "global_mean": mu_g})


def neural_collapse(
    h: xr.DataArray,
    labels: xr.DataArray,
    *,
    W: xr.DataArray | None = None,
    b: xr.DataArray | None = None,
    n_classes: int | None = None,
    rcond: float | None = None,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    out_dim: Hashable = "out",
) -> xr.Dataset:
    """Neural collapse metrics NC1, NC2 (and NC3, NC4 given the readout).

    Parameters
    ----------
    h : xarray.DataArray
        Features (the readout's input for NC3/NC4), dims ``(..., sample_dim, in_dim)``.
    labels : xarray.DataArray
        Integer classes, dims ``(sample_dim,)``; ``n_classes`` defaults to ``max + 1``.
    W : xarray.DataArray, optional
        Readout weight, dims ``(..., out_dim, in_dim)`` with ``out_dim`` of size ``C``.
    b : xarray.DataArray, optional
        Readout bias, dims ``(..., out_dim)`` (zero when omitted).

    Returns
    -------
    xarray.Dataset
        ``nc1``, ``nc2_equinorm``, ``nc2_equiangularity`` and, with ``W``,
        ``nc3`` and ``nc4``.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dims=("sample", "in"))
    >>> labels = xr.DataArray([0, 0, 1, 1], dims="sample")
    >>> W = xr.DataArray([[-1.0, 1.0], [1.0, -1.0]], dims=("out", "in"))
    >>> res = neural_collapse(h, labels, W=W)
    >>> float(res.nc1), float(res.nc3), float(res.nc4)
    (0.0, 0.0, 0.0)
    """
    stats, layout, c, _ = _collapse_stats(h, labels, n_classes, sample_dim, in_dim)
    out = _nc1_nc2(stats, layout, rcond)
    if W is None:
        return out
    w_c, b_c = _readout(W, b, c, h.sizes[in_dim], in_dim, out_dim)
    means = _class_means(stats, layout, c, _FEATURE_DIM, CLASS_DIM)
    mu = means.class_mean.drop_vars(CLASS_DIM)
    out["nc3"] = _nc3(w_c, mu, means.global_mean)
    out["nc4"] = _nc4(h, mu, w_c, b_c, sample_dim, in_dim)
    return out


def _nc1_nc2(stats: xr.DataArray, layout, rcond: float | None) -> xr.Dataset:
    """NC1 and NC2 from the streamed statistics, one value per leading entry."""

    def finish(st: np.ndarray) -> tuple[FloatArray, FloatArray, FloatArray]:
        res = collapse_from_stats_np(unpack(as_float64(st), layout), rcond=rcond)
        return res["nc1"], res["nc2_equinorm"], res["nc2_equiangularity"]

    nc1, equinorm, angular = apply(
        finish, stats, input_core_dims=[[STAT_DIM]], output_core_dims=[[], [], []]
    )
    nc1.attrs["long_name"] = "NC1 tr(Sigma_W Sigma_B^+)/C"
    equinorm.attrs["long_name"] = "NC2 equinorm: std/mean of ||mu_c - mu_G||"
    angular.attrs["long_name"] = "NC2 equiangularity: mean |cos + 1/(C-1)| over class pairs"
    return xr.Dataset({"nc1": nc1, "nc2_equinorm": equinorm, "nc2_equiangularity": angular})


def _readout(
    W: xr.DataArray,
    b: xr.DataArray | None,
    c: int,
    d: int,
    in_dim: Hashable,
    out_dim: Hashable,
) -> tuple[xr.DataArray, xr.DataArray]:
    """The readout checked against ``c`` classes of ``d`` features, on the dims of the
    class means (``b`` zero when omitted)."""
    require_dims(W, [out_dim, in_dim], "W")
    if W.sizes[out_dim] != c or W.sizes[in_dim] != d:
        raise ValueError(
            f"readout W is {W.sizes[out_dim]} x {W.sizes[in_dim]}; expected {c} classes x {d} features"
        )
    if b is None:
        b = xr.zeros_like(W.isel({in_dim: 0}, drop=True))
    w_c = W.rename({out_dim: CLASS_DIM, in_dim: _FEATURE_DIM}).drop_vars(
        [k for k in W.coords if k in (out_dim, in_dim)]
    )
    b_c = b.rename({out_dim: CLASS_DIM}).drop_vars([k for k in b.coords if k == out_dim])
    return w_c, b_c


def _nc3(w_c: xr.DataArray, mu: xr.DataArray, mu_g: xr.DataArray) -> xr.DataArray:
    """NC3 of the renamed readout and the class means."""
    nc3 = apply(
        nc3_np,
        w_c,
        mu,
        mu_g,
        input_core_dims=[[CLASS_DIM, _FEATURE_DIM], [CLASS_DIM, _FEATURE_DIM], [_FEATURE_DIM]],
    )
    nc3.attrs["long_name"] = "NC3 ||W^T/||W|| - M/||M||||_F^2"
    return nc3


def _nc4(
    h: xr.DataArray,
    mu: xr.DataArray,
    w_c: xr.DataArray,
    b_c: xr.DataArray,
    sample_dim: Hashable,
    in_dim: Hashable,
) -> xr.DataArray:
    """NC4: the second pass over the samples, counting readout/nearest-mean disagreements."""

    def block(hb, mub, wb, bb):
        return _mismatches(as_float64(hb), as_float64(mub), as_float64(wb), as_float64(bb))[
            ..., None
        ]

    count = stream_sum(
        block,
        [h],
        reduce_dim=sample_dim,
        core_dims=[[in_dim]],
        size=1,
        constants=[mu, w_c, b_c],
        constant_core_dims=[
            [CLASS_DIM, _FEATURE_DIM],
            [CLASS_DIM, _FEATURE_DIM],
            [CLASS_DIM],
        ],
    )
    nc4 = count.isel({STAT_DIM: 0}, drop=True) / h.sizes[sample_dim]
    nc4.attrs["long_name"] = "NC4 fraction of samples where readout and nearest class mean disagree"
    return nc4
