"""Spectrum of the weight Gram matrix, effective and stable rank, Frobenius and spectral norms.

Eigenvalues of ``W^T W`` come from the smaller of ``W^T W`` and ``W W^T``
(same nonzero spectrum). Weights have dims ``(..., "out", "in")``; every
function takes ``out_dim`` / ``in_dim`` to override them.
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
    mask_nonfinite,
    poison,
    quiet,
    require_dims,
    sanitize,
    xr,
)
from gramlin_analyze.reducers.gram import gram_np

__all__ = [
    "gram_spectrum_np",
    "effective_rank_np",
    "stable_rank_np",
    "frobenius_norm_np",
    "spectral_norm_np",
    "gram_spectrum",
    "effective_rank",
    "stable_rank",
    "frobenius_norm",
    "spectral_norm",
]


def _spectrum_core(w: FloatArray) -> FloatArray:
    """All ``min(d_out, d_in)`` eigenvalues of ``W^T W``, descending, clipped at 0."""
    clean, bad = sanitize(w, 2)
    d_out, d_in = clean.shape[-2:]
    small = gram_np(clean, side="out" if d_in > d_out else "in")
    eig = np.linalg.eigvalsh(small)[..., ::-1]
    # eigh of a PSD matrix returns round-off negatives of order eps*max: they are zeros.
    return poison(np.ascontiguousarray(np.clip(eig, 0.0, None)), bad, 1)


@quiet
def gram_spectrum_np(w: npt.ArrayLike, *, k: int | None = None) -> FloatArray:
    """Eigenvalues of ``W^T W`` in descending order.

    Computed from the smaller of ``W^T W`` and ``W W^T`` (same nonzero
    spectrum). Round-off negatives are clipped to 0.

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)
        Weights.
    k : int, optional
        Number of eigenvalues returned; default ``min(d_out, d_in)`` (all that
        can be nonzero). For ``k > min(d_out, d_in)`` the spectrum is padded
        with the exact zero eigenvalues of ``W^T W`` up to ``d_in`` and then
        with NaN (no such eigenvalue), so layers of different widths can share
        one ``k`` axis.

    Returns
    -------
    numpy.ndarray, shape (..., k)

    Examples
    --------
    >>> gram_spectrum_np([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]], k=4)
    array([ 9.,  4.,  0., nan])
    """
    w = as_float64(w)
    d_out, d_in = w.shape[-2:]
    r = min(d_out, d_in)
    k = r if k is None else int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    eig = _spectrum_core(w)
    lead = eig.shape[:-1]
    if k <= r:
        return np.ascontiguousarray(eig[..., :k])
    zeros = np.zeros(lead + (max(0, min(k, d_in) - r),))
    zeros[batch_bad(eig, 1)] = np.nan
    nans = np.full(lead + (max(0, k - d_in),), np.nan)
    return np.concatenate([eig, zeros, nans], axis=-1)


@quiet
def effective_rank_np(eigenvalues: npt.ArrayLike) -> FloatArray:
    """Effective rank ``exp(-sum p log p)`` with ``p = lambda / sum(lambda)``.

    Parameters
    ----------
    eigenvalues : array_like, shape (..., k)
        Nonnegative spectrum (reduced axis last), e.g. from :func:`gram_spectrum_np`.

    Returns
    -------
    numpy.ndarray, shape (...)
        Between 1 and the number of nonzero eigenvalues; NaN for an all-zero
        spectrum (0/0), a negative eigenvalue, or a NaN/Inf.

    Examples
    --------
    >>> float(effective_rank_np([2.0, 2.0, 0.0]))
    2.0
    """
    lam = as_float64(eigenvalues)
    p = lam / lam.sum(axis=-1, keepdims=True)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    plogp = np.where(p < 0, np.nan, plogp)
    ent = -plogp.sum(axis=-1)
    ent = np.where(np.isnan(p).any(axis=-1), np.nan, ent)
    return mask_nonfinite(np.exp(ent), 0, (lam, 1))


@quiet
def frobenius_norm_np(w: npt.ArrayLike) -> FloatArray:
    """Frobenius norm over the last two axes; NaN when a NaN/Inf is present.

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> float(frobenius_norm_np([[3.0, 0.0], [0.0, 4.0]]))
    5.0
    """
    w = as_float64(w)
    out = np.sqrt(np.sum(w * w, axis=(-2, -1)))
    return np.where(batch_bad(w, 2), np.nan, out)


@quiet
def spectral_norm_np(w: npt.ArrayLike) -> FloatArray:
    """Spectral norm (largest singular value) over the last two axes.

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> float(spectral_norm_np([[3.0, 0.0], [0.0, 4.0]]))
    4.0
    """
    clean, bad = sanitize(as_float64(w), 2)
    if min(clean.shape[-2:]) == 0:
        return np.where(bad, np.nan, np.zeros(clean.shape[:-2]))
    out = np.linalg.svd(clean, compute_uv=False)[..., 0]
    return np.where(bad, np.nan, out)


@quiet
def stable_rank_np(w: npt.ArrayLike) -> FloatArray:
    """Stable rank ``||W||_F^2 / ||W||_2^2`` over the last two axes.

    NaN for an all-zero matrix (0/0) and for NaN/Inf input.

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> float(stable_rank_np([[3.0, 0.0], [0.0, 4.0]]))
    1.5625
    """
    w = as_float64(w)
    return frobenius_norm_np(w) ** 2 / spectral_norm_np(w) ** 2


# ----------------------------------------------------------------------------
# xarray wrappers
# ----------------------------------------------------------------------------


def gram_spectrum(
    W: xr.DataArray,
    *,
    k: int | None = None,
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    k_dim: Hashable = "k",
) -> xr.DataArray:
    """Eigenvalues of ``W^T W``, descending, along a new dim ``k_dim``.

    See :func:`gram_spectrum_np` for ``k`` (default ``min(d_out, d_in)``;
    zero- then NaN-padded beyond). The new dim has an integer coordinate.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
    k : int, optional
        Number of eigenvalues.
    out_dim, in_dim : hashable
        Dim names of the weight.
    k_dim : hashable
        Name of the new eigenvalue dim.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., k_dim)``.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dims=("out", "in"))
    >>> gram_spectrum(W).values
    array([9., 4.])
    """
    require_dims(W, [out_dim, in_dim], "W")
    k = min(W.sizes[out_dim], W.sizes[in_dim]) if k is None else int(k)
    out = apply(
        gram_spectrum_np,
        W,
        input_core_dims=[[out_dim, in_dim]],
        output_core_dims=[[k_dim]],
        output_sizes={k_dim: k},
        kwargs={"k": k},
    )
    out = out.assign_coords({k_dim: np.arange(k)})
    out.attrs["long_name"] = "eigenvalues of W^T W (descending)"
    return out


def _effective_rank_from_w(w: np.ndarray) -> FloatArray:
    return effective_rank_np(_spectrum_core(as_float64(w)))


def _scalar_of_w(func, W: xr.DataArray, out_dim: Hashable, in_dim: Hashable, name: str):
    require_dims(W, [out_dim, in_dim], "W")
    out = apply(func, W, input_core_dims=[[out_dim, in_dim]])
    out.attrs["long_name"] = name
    return out


def effective_rank(
    W: xr.DataArray, *, out_dim: Hashable = "out", in_dim: Hashable = "in"
) -> xr.DataArray:
    """Effective rank of ``W^T W``: ``exp`` of the entropy of its normalized spectrum.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
    out_dim, in_dim : hashable
        Dim names of the weight.

    Returns
    -------
    xarray.DataArray
        Over the leading dims; NaN for a zero weight or NaN/Inf input.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("out", "in"))
    >>> float(effective_rank(W))
    2.0
    """
    return _scalar_of_w(_effective_rank_from_w, W, out_dim, in_dim, "effective rank of W^T W")


def stable_rank(
    W: xr.DataArray, *, out_dim: Hashable = "out", in_dim: Hashable = "in"
) -> xr.DataArray:
    """Stable rank ``||W||_F^2 / ||W||_2^2``.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
    out_dim, in_dim : hashable
        Dim names of the weight.

    Returns
    -------
    xarray.DataArray
        Over the leading dims; NaN for a zero weight or NaN/Inf input.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[3.0, 0.0], [0.0, 4.0]], dims=("out", "in"))
    >>> float(stable_rank(W))
    1.5625
    """
    return _scalar_of_w(stable_rank_np, W, out_dim, in_dim, "stable rank of W")


def frobenius_norm(
    W: xr.DataArray, *, out_dim: Hashable = "out", in_dim: Hashable = "in"
) -> xr.DataArray:
    """Frobenius norm ``||W||_F`` over ``(out_dim, in_dim)``.

    Also works on square matrices: pass ``out_dim="in_i", in_dim="in_j"``.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
    out_dim, in_dim : hashable
        Dim names of the weight.

    Returns
    -------
    xarray.DataArray
        Over the leading dims.

    Examples
    --------
    >>> import xarray as xr
    >>> float(frobenius_norm(xr.DataArray([[3.0, 4.0]], dims=("out", "in"))))
    5.0
    """
    return _scalar_of_w(frobenius_norm_np, W, out_dim, in_dim, "Frobenius norm")


def spectral_norm(
    W: xr.DataArray, *, out_dim: Hashable = "out", in_dim: Hashable = "in"
) -> xr.DataArray:
    """Spectral norm ``||W||_2`` (largest singular value) over ``(out_dim, in_dim)``.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
    out_dim, in_dim : hashable
        Dim names of the weight.

    Returns
    -------
    xarray.DataArray
        Over the leading dims.

    Examples
    --------
    >>> import xarray as xr
    >>> float(spectral_norm(xr.DataArray([[3.0, 0.0], [0.0, 4.0]], dims=("out", "in"))))
    4.0
    """
    return _scalar_of_w(spectral_norm_np, W, out_dim, in_dim, "spectral norm")
