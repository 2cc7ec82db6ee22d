"""Feature Learning Equation terms: ``dL/dW``, the exact second-order term, the residual.

For one plain gradient step ``W+ = W - gamma G`` with ``G = dL/dW``,
``W+^T W+ - W^T W = VCS + gamma^2 (G^T G - sum_i g_i g_i^T)`` exactly
(MATH.md). Between consecutive checkpoints of a full-batch GD run the
toolkit reports ``fle_residual = ||dGram - VCS||_F / ||dGram||_F`` and the
analytic second-order term, which must account for it.

Along a trajectory of checkpoints ``a < b`` the same terms are taken per
interval (:func:`fle_interval_metrics_np`), with the VCS summed over the
interval by the trapezoid rule (:func:`interval_vcs_np`,
:func:`accumulate_vcs_np`): what ``analyze`` stores in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    FloatArray,
    apply,
    as_float64,
    batch_bad,
    from_stats,
    gamma_array,
    mask_nonfinite,
    poison,
    quiet,
    require_dims,
    stream_sum,
    sym,
    xr,
)
from gramlin_analyze.reducers.alignment import norm_ratio_np, pearson_np
from gramlin_analyze.reducers.vc import SQUARE, _t

__all__ = [
    "weight_gradient_np",
    "second_order_term_np",
    "fle_residual_np",
    "interval_vcs_np",
    "accumulate_vcs_np",
    "interval_gradient_np",
    "fle_interval_metrics_np",
    "weight_gradient",
    "second_order_term",
    "fle_residual",
]


@quiet
def weight_gradient_np(dz: npt.ArrayLike, h: npt.ArrayLike) -> FloatArray:
    """``G = dL/dW = sum_i (dL/dz_i) h_i^T`` over the sample axis.

    Parameters
    ----------
    dz : array_like, shape (..., n_samples, d_out)
        Gradient of the loss at the layer's output (with the loss reduction
        already applied, e.g. the ``1/N`` of a mean).
    h : array_like, shape (..., n_samples, d_in)
        Layer inputs.

    Returns
    -------
    numpy.ndarray, shape (..., d_out, d_in)

    Examples
    --------
    >>> weight_gradient_np([[1.0], [2.0]], [[1.0, 0.0], [0.0, 1.0]])
    array([[1., 2.]])
    """
    dz, h = as_float64(dz), as_float64(h)
    return poison(_t(dz) @ h, batch_bad(dz, 2) | batch_bad(h, 2), 2)


@quiet
def second_order_term_np(
    G: npt.ArrayLike, sum_gg: npt.ArrayLike, gamma: npt.ArrayLike
) -> FloatArray:
    """Exact second-order FLE term ``gamma^2 (G^T G - sum_i g_i g_i^T)``.

    ``W+^T W+ - W^T W = VCS + second_order_term`` for one plain gradient step
    ``W+ = W - gamma G``.

    Parameters
    ----------
    G : array_like, shape (..., d_out, d_in)
        ``dL/dW``.
    sum_gg : array_like, shape (..., d_in, d_in)
        ``sum_i g_i g_i^T``.
    gamma : array_like
        Learning rate, broadcast against the batch axes.

    Returns
    -------
    numpy.ndarray, shape (..., d_in, d_in)

    Examples
    --------
    >>> second_order_term_np([[2.0]], [[1.0]], 0.5)
    array([[0.75]])
    """
    G, gg, gam = as_float64(G), as_float64(sum_gg), as_float64(gamma)
    out = gam[..., None, None] ** 2 * (sym(_t(G) @ G) - gg)
    return mask_nonfinite(out, 2, (G, 2), (gg, 2), (gam, 0))


@quiet
def fle_residual_np(dgram: npt.ArrayLike, vcs: npt.ArrayLike) -> FloatArray:
    """``||dGram - VCS||_F / ||dGram||_F`` over the last two axes.

    NaN when ``dGram`` is zero (0/0) or a NaN/Inf is present.

    Parameters
    ----------
    dgram, vcs : array_like, shape (..., d, d)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> float(fle_residual_np([[3.0, 0.0], [0.0, 4.0]], [[3.0, 0.0], [0.0, 3.0]]))
    0.2
    """
    d, v = as_float64(dgram), as_float64(vcs)
    out = np.sqrt(np.sum((d - v) ** 2, axis=(-2, -1)) / np.sum(d * d, axis=(-2, -1)))
    return mask_nonfinite(out, 0, (d, 2), (v, 2))


@quiet
def interval_vcs_np(vcs_a: npt.ArrayLike, vcs_b: npt.ArrayLike, gap: npt.ArrayLike) -> FloatArray:
    """Trapezoid estimate ``(b - a)(VCS_a + VCS_b)/2`` of the VCS summed over an interval.

    The VCS is known at checkpoints only; this estimates its sum over the
    ``b - a`` optimizer steps between two of them (MATH.md).

    Parameters
    ----------
    vcs_a, vcs_b : array_like, shape (..., d, d)
        VCS at the first and the last checkpoint of the interval.
    gap : array_like
        Optimizer steps ``b - a``, broadcast against the batch axes.

    Returns
    -------
    numpy.ndarray, shape (..., d, d)
        All NaN for a batch entry with a NaN/Inf input.

    Examples
    --------
    >>> interval_vcs_np([[1.0]], [[3.0]], 10)
    array([[20.]])
    """
    va, vb, g = as_float64(vcs_a), as_float64(vcs_b), as_float64(gap)
    out = g[..., None, None] * (va + vb) / 2
    return mask_nonfinite(out, 2, (va, 2), (vb, 2), (g, 0))


@quiet
def accumulate_vcs_np(
    accumulated: npt.ArrayLike, vcs_a: npt.ArrayLike, vcs_b: npt.ArrayLike, gap: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """One trapezoid step of the accumulated VCS: the interval's estimate, and the new sum.

    Chained over consecutive checkpoints from a zero start it gives
    ``accumulate_trapezoid_np`` one interval at a time, so a trajectory can
    be extended by new checkpoints without re-reading the old ones.

    Parameters
    ----------
    accumulated : array_like, shape (..., d, d)
        Accumulated VCS up to checkpoint ``a``.
    vcs_a, vcs_b, gap
        As for :func:`interval_vcs_np`.

    Returns
    -------
    increment, accumulated : numpy.ndarray, shape (..., d, d)
        :func:`interval_vcs_np` of the interval, and ``accumulated + increment``
        (all NaN for a batch entry with a NaN/Inf input).

    Examples
    --------
    >>> accumulate_vcs_np([[5.0]], [[1.0]], [[3.0]], 10)
    (array([[20.]]), array([[25.]]))
    """
    acc = as_float64(accumulated)
    increment = interval_vcs_np(vcs_a, vcs_b, gap)
    return increment, mask_nonfinite(acc + increment, 2, (acc, 2))


@quiet
def interval_gradient_np(
    W_a: npt.ArrayLike, W_b: npt.ArrayLike, gamma: npt.ArrayLike, gap: npt.ArrayLike
) -> FloatArray:
    """``(W_a - W_b) / (gamma (b - a))``: the constant ``dL/dW`` that leads from ``W_a`` to ``W_b``.

    ``b - a`` plain gradient steps of rate ``gamma`` with this gradient move
    ``W_a`` to ``W_b``; it is the ``G`` of :func:`second_order_term_np` over
    an interval of checkpoints.

    Parameters
    ----------
    W_a, W_b : array_like, shape (..., d_out, d_in)
        Weights at the first and the last checkpoint of the interval.
    gamma : array_like
        Learning rate at ``a``, broadcast against the batch axes.
    gap : array_like
        Optimizer steps ``b - a``.

    Returns
    -------
    numpy.ndarray, shape (..., d_out, d_in)
        All NaN for a batch entry with a NaN/Inf input.

    Examples
    --------
    >>> interval_gradient_np([[1.0, 2.0]], [[0.0, 1.0]], 0.5, 4)
    array([[0.5, 0.5]])
    """
    wa, wb, gam, g = as_float64(W_a), as_float64(W_b), as_float64(gamma), as_float64(gap)
    out = (wa - wb) / (gam * g)[..., None, None]
    return mask_nonfinite(out, 2, (wa, 2), (wb, 2), (gam, 0), (g, 0))


@quiet
def fle_interval_metrics_np(
    dgram: npt.ArrayLike,
    vcs_a: npt.ArrayLike,
    increment: npt.ArrayLike,
    second_order: npt.ArrayLike,
    gap: npt.ArrayLike,
) -> dict[str, FloatArray]:
    """How well the VCS explains the Gram change over an interval of checkpoints ``a < b``.

    Parameters
    ----------
    dgram : array_like, shape (..., d, d)
        ``W_b^T W_b - W_a^T W_a``.
    vcs_a : array_like, shape (..., d, d)
        VCS at ``a``.
    increment : array_like, shape (..., d, d)
        The interval's trapezoid estimate (:func:`interval_vcs_np`).
    second_order : array_like, shape (..., d, d)
        Second-order term of the interval (:func:`second_order_term_np` of
        :func:`interval_gradient_np`).
    gap : array_like
        Optimizer steps ``b - a``, broadcast against the batch axes.

    Returns
    -------
    dict of str to numpy.ndarray, shape (...)
        ``dgram_vcs_corr`` and ``vcs_interval_corr``: Pearson correlation
        (diag, full) of ``dgram`` and ``increment``; ``vcs_interval_ratio``:
        ``||increment||_F / ||dgram||_F``; ``fle_residual``:
        ``||dgram - (b - a) VCS_a||_F / ||dgram||_F``; ``fle_second_order``:
        ``||second_order||_F / ||dgram||_F``. The last two are NaN when
        ``dgram`` is zero (two identical checkpoints); every entry is NaN for
        a batch entry with a NaN/Inf input.

    Examples
    --------
    >>> res = fle_interval_metrics_np(
    ...     [[4.0, 0.0], [0.0, 3.0]], [[2.0, 0.0], [0.0, 1.0]],
    ...     [[4.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 1.0]], 2)
    >>> {k: round(float(v), 6) for k, v in res.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'dgram_vcs_corr': 1.0, 'vcs_interval_corr': 0.971061, 'vcs_interval_ratio': 0.894427,
     'fle_residual': 0.2, 'fle_second_order': 0.2}
    """
    d, v, inc, second, g = (as_float64(x) for x in (dgram, vcs_a, increment, second_order, gap))
    norm_d = _fro(d)
    residual = _relative(_fro(d - g[..., None, None] * v), norm_d)
    return {
        "dgram_vcs_corr": pearson_np(d, inc, mode="diag"),
        "vcs_interval_corr": pearson_np(d, inc, mode="full"),
        "vcs_interval_ratio": norm_ratio_np(inc, d),
        "fle_residual": mask_nonfinite(residual, 0, (d, 2), (v, 2), (g, 0)),
        "fle_second_order": mask_nonfinite(_relative(_fro(second), norm_d), 0, (d, 2), (second, 2)),
    }


def _fro(x: FloatArray) -> FloatArray:
    """Frobenius norm of each matrix, as ``np.linalg.norm`` of that one matrix.

    One matrix at a time: the batched ``np.linalg.norm(x, axis=(-2, -1))``
    sums in another order, and stored results keep their bits.
    """
    if x.ndim == 2:
        return np.asarray(np.linalg.norm(x))
    flat = x.reshape(-1, *x.shape[-2:])
    return np.array([np.linalg.norm(m) for m in flat], dtype=np.float64).reshape(x.shape[:-2])


def _relative(num: FloatArray, den: FloatArray) -> FloatArray:
    """``num / den``; NaN where ``den`` is not positive (0, NaN)."""
    return np.where(den > 0, num / den, np.nan)


def weight_gradient(
    dz: xr.DataArray,
    h: xr.DataArray,
    *,
    sample_dim: Hashable = "sample",
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
) -> xr.DataArray:
    """``G = dL/dW = sum_i (dL/dz_i) h_i^T``, streamed over sample blocks.

    Parameters
    ----------
    dz : xarray.DataArray
        Gradient at the layer output, dims ``(..., sample_dim, out_dim)``
        (loss reduction included).
    h : xarray.DataArray
        Layer inputs, dims ``(..., sample_dim, in_dim)``.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., out_dim, in_dim)``.

    Examples
    --------
    >>> import xarray as xr
    >>> dz = xr.DataArray([[1.0], [2.0]], dims=("sample", "out"))
    >>> h = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("sample", "in"))
    >>> weight_gradient(dz, h).values
    array([[1., 2.]])
    """
    require_dims(dz, [sample_dim, out_dim], "dz")
    require_dims(h, [sample_dim, in_dim], "h")
    d_out, d_in = dz.sizes[out_dim], h.sizes[in_dim]

    def block(z: np.ndarray, x: np.ndarray) -> FloatArray:
        G = weight_gradient_np(z, x)
        return G.reshape(*G.shape[:-2], -1)

    stats = stream_sum(
        block, [dz, h], reduce_dim=sample_dim, core_dims=[[out_dim], [in_dim]], size=d_out * d_in
    )
    out = from_stats(stats.data.reshape(*stats.shape[:-1], d_out, d_in), stats, [out_dim, in_dim])
    out.attrs["long_name"] = "dL/dW"
    return out


def second_order_term(
    G: xr.DataArray,
    sum_gg: xr.DataArray,
    gamma: float | xr.DataArray,
    *,
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """Analytic second-order FLE term ``gamma^2 (G^T G - sum_i g_i g_i^T)``.

    For one plain gradient step ``W+ = W - gamma G`` from a checkpoint,
    ``W+^T W+ - W^T W = VCS + second_order_term`` exactly.

    Parameters
    ----------
    G : xarray.DataArray
        ``dL/dW``, dims ``(..., out_dim, in_dim)`` (e.g. :func:`weight_gradient`).
    sum_gg : xarray.DataArray
        ``sum_i g_i g_i^T``, dims ``(..., *dims)`` (``vc_stats(...).sum_gg``).
    gamma : float or xarray.DataArray
        Learning rate.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., *dims)``.

    Examples
    --------
    >>> import xarray as xr
    >>> G = xr.DataArray([[2.0]], dims=("out", "in"))
    >>> gg = xr.DataArray([[1.0]], dims=("in_i", "in_j"))
    >>> second_order_term(G, gg, 0.5).values
    array([[0.75]])
    """
    require_dims(G, [out_dim, in_dim], "G")
    require_dims(sum_gg, dims, "sum_gg")
    out = apply(
        second_order_term_np,
        G,
        sum_gg,
        gamma_array(gamma),
        input_core_dims=[[out_dim, in_dim], dims, []],
        output_core_dims=[dims],
    )
    out.attrs["long_name"] = "second-order FLE term gamma^2 (G^T G - sum g g^T)"
    return out


def fle_residual(
    dgram: xr.DataArray,
    vcs: xr.DataArray,
    *,
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """FLE residual ``||dGram - VCS||_F / ||dGram||_F``.

    Entries are paired by their coordinates (inner join on leading dims such
    as ``step``): compute ``dgram`` with ``gram_change(W, label="lower")`` so
    that each one-step change sits at the step where the VCS was measured.
    Adding :func:`second_order_term` to ``vcs`` must bring the residual to
    round-off for full-batch gradient descent.

    Parameters
    ----------
    dgram : xarray.DataArray
        Gram change, dims ``(..., *dims)``.
    vcs : xarray.DataArray
        VCS (plus, optionally, the second-order term), dims ``(..., *dims)``.
    dims : tuple of two hashables
        The matrix dims.

    Returns
    -------
    xarray.DataArray
        Over the shared leading coordinates.

    Examples
    --------
    >>> import xarray as xr
    >>> a = xr.DataArray([[3.0, 0.0], [0.0, 4.0]], dims=SQUARE)
    >>> b = xr.DataArray([[3.0, 0.0], [0.0, 3.0]], dims=SQUARE)
    >>> float(fle_residual(a, b))
    0.2
    """
    require_dims(dgram, dims, "dgram")
    require_dims(vcs, dims, "vcs")
    out = apply(fle_residual_np, dgram, vcs, input_core_dims=[dims, dims], join="inner")
    out.attrs["long_name"] = "FLE residual ||dGram - VCS||_F / ||dGram||_F"
    return out
