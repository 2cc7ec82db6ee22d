"""Gram matrices of weights, their spectrum, ranks and norms, and their change over steps.

A layer's weight ``W`` has dims ``(..., "out", "in")``; its Gram matrix
``W^T W`` has dims ``("in_i", "in_j")`` (two distinct names for the two sides
of a square matrix) and ``W W^T`` has dims ``("out_i", "out_j")``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import numpy as np
import numpy.typing as npt
import xarray as xr

from gramlin_analyze.reducers._common import (
    STAT_DIM,
    FloatArray,
    apply,
    as_float64,
    batch_bad,
    mask_nonfinite,
    poison,
    quiet,
    require_dims,
    sanitize,
    stream_sum,
    sym,
)

__all__ = [
    "gram_np",
    "gram_spectrum_np",
    "effective_rank_np",
    "stable_rank_np",
    "frobenius_norm_np",
    "spectral_norm_np",
    "gram",
    "gram_spectrum",
    "effective_rank",
    "stable_rank",
    "frobenius_norm",
    "spectral_norm",
    "gram_change",
]

Side = Literal["in", "out"]


@quiet
def gram_np(w: npt.ArrayLike, *, side: Side = "in") -> FloatArray:
    """Gram matrix of a batch of weights.

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)
        Weights.
    side : {"in", "out"}
        ``"in"`` gives ``W^T W`` of shape ``(..., d_in, d_in)``; ``"out"``
        gives ``W W^T`` of shape ``(..., d_out, d_out)``.

    Returns
    -------
    numpy.ndarray
        Symmetric PSD float64 matrices; all NaN for a batch entry of ``w``
        holding a NaN or Inf.

    Examples
    --------
    >>> gram_np([[1.0, 2.0], [3.0, 4.0]])
    array([[10., 14.],
           [14., 20.]])
    """
    w = as_float64(w)
    if side == "in":
        out = np.swapaxes(w, -1, -2) @ w
    elif side == "out":
        out = w @ np.swapaxes(w, -1, -2)
    else:
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    return poison(sym(out), batch_bad(w, 2), 2)


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


def _gram_block(w: np.ndarray) -> FloatArray:
    g = gram_np(w)
    return g.reshape(*g.shape[:-2], -1)


def gram(
    W: xr.DataArray,
    *,
    side: Side = "in",
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] | None = None,
) -> xr.DataArray:
    """Gram matrix ``W^T W`` (or ``W W^T``) of a weight DataArray.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(..., out_dim, in_dim)``, NumPy or Dask backed.
        A weight tiled along ``out_dim`` is reduced tile by tile.
    side : {"in", "out"}
        ``"in"``: ``W^T W``; ``"out"``: ``W W^T``.
    out_dim, in_dim : hashable
        Dim names of the weight.
    dims : tuple of two hashables, optional
        Dims of the result; default ``("in_i", "in_j")`` for ``side="in"`` and
        ``("out_i", "out_j")`` for ``side="out"``.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., *dims)``, float64.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[1.0, 2.0], [3.0, 4.0]], dims=("out", "in"))
    >>> gram(W).values
    array([[10., 14.],
           [14., 20.]])
    """
    require_dims(W, [out_dim, in_dim], "W")
    if side == "in":
        summed, kept, default = out_dim, in_dim, ("in_i", "in_j")
    elif side == "out":
        summed, kept, default = in_dim, out_dim, ("out_i", "out_j")
    else:
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    dims = default if dims is None else dims
    d = W.sizes[kept]
    stats = stream_sum(
        # blocks arrive as (..., summed, kept): both sides are block^T block
        _gram_block,
        [W],
        reduce_dim=summed,
        core_dims=[[kept]],
        size=d * d,
    )
    out = _to_square(stats, d, dims)
    if kept in W.coords:
        out = out.assign_coords({dims[0]: W[kept].values, dims[1]: W[kept].values})
    out.attrs["long_name"] = "W^T W" if side == "in" else "W W^T"
    return out


def _to_square(stats: xr.DataArray, d: int, dims: tuple[Hashable, Hashable]) -> xr.DataArray:
    data = stats.data.reshape(*stats.shape[:-1], d, d)
    lead = [x for x in stats.dims if x != STAT_DIM]
    coords = {k: v for k, v in stats.coords.items() if STAT_DIM not in v.dims}
    return xr.DataArray(data, dims=[*lead, *dims], coords=coords)


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

    Examples
    --------
    >>> import xarray as xr
    >>> float(spectral_norm(xr.DataArray([[3.0, 0.0], [0.0, 4.0]], dims=("out", "in"))))
    4.0
    """
    return _scalar_of_w(spectral_norm_np, W, out_dim, in_dim, "spectral norm")


def check_steps(da: xr.DataArray, step_dim: Hashable) -> np.ndarray:
    """The step coordinate as float64, checked strictly increasing."""
    if step_dim not in da.dims:
        raise ValueError(f"needs a {step_dim!r} dim; has {list(da.dims)}")
    steps = (
        np.asarray(da[step_dim].values, dtype=np.float64)
        if step_dim in da.coords
        else np.arange(da.sizes[step_dim], dtype=np.float64)
    )
    if steps.size > 1 and not np.all(np.diff(steps) > 0):
        raise ValueError(f"the {step_dim!r} coordinate must be strictly increasing")
    return steps


def gram_change(
    W: xr.DataArray,
    *,
    step_dim: Hashable = "step",
    label: Literal["upper", "lower"] = "upper",
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = ("in_i", "in_j"),
) -> xr.DataArray:
    """Change of ``W^T W`` between consecutive steps: ``W_b^T W_b - W_a^T W_a``.

    Parameters
    ----------
    W : xarray.DataArray
        Weights with dims ``(step_dim, ..., out_dim, in_dim)``; the step
        coordinate (if any) must be strictly increasing.
    label : {"upper", "lower"}
        Label each interval ``[a, b]`` by ``b`` (default, like
        :meth:`xarray.DataArray.diff`) or by ``a``. Use ``"lower"`` to pair
        the change with quantities measured at the interval start, such as
        the VCS of the Feature Learning Equation.

    Returns
    -------
    xarray.DataArray
        One entry per interval (``n_steps - 1``), with non-dim coordinates
        ``{step_dim}_start`` and ``{step_dim}_end``.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[[1.0]], [[2.0]], [[4.0]]], dims=("step", "out", "in"),
    ...                  coords={"step": [0, 10, 20]})
    >>> d = gram_change(W)
    >>> d.values.ravel(), d.step_start.values
    (array([ 3., 12.]), array([ 0, 10]))
    """
    if label not in ("upper", "lower"):
        raise ValueError(f"label must be 'upper' or 'lower', got {label!r}")
    steps = check_steps(W, step_dim)
    g = gram(W, out_dim=out_dim, in_dim=in_dim, dims=dims)
    n = g.sizes[step_dim]
    upper = g.isel({step_dim: slice(1, None)})
    lower = g.isel({step_dim: slice(None, n - 1)})
    keep = upper if label == "upper" else lower
    out = keep.copy(data=upper.data - lower.data)
    start = W[step_dim].values[:-1] if step_dim in W.coords else steps[:-1]
    end = W[step_dim].values[1:] if step_dim in W.coords else steps[1:]
    out = out.assign_coords(
        {f"{step_dim}_start": (step_dim, start), f"{step_dim}_end": (step_dim, end)}
    )
    out.attrs["long_name"] = "change of W^T W between consecutive steps"
    return out
