"""Alignment of two matrices (Pearson, cosine) and interval consistency of Gram vs VCS.

Two Pearson modes (MATH.md, "Gram-VC alignment"):

* ``"diag"``: correlation of the diagonal entries (the paper's convention);
* ``"full"``: correlation of all entries (the Neural Feature Ansatz papers').

Matrices are compared over two dims, ``("in_i", "in_j")`` by default; leading
dims (such as ``step``) are paired by their coordinates (inner join).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    FloatArray,
    apply,
    as_float64,
    mask_nonfinite,
    quiet,
    require_dims,
    xr,
)
from gramlin_analyze.reducers.vc import _step_pairs, interval_vcs

__all__ = [
    "pearson_np",
    "cosine_np",
    "norm_ratio_np",
    "pearson",
    "cosine_similarity",
    "vcs_interval_consistency",
]

Mode = Literal["diag", "full"]
SQUARE = ("in_i", "in_j")


def _entries(a: FloatArray, mode: Mode) -> FloatArray:
    if mode == "diag":
        return np.diagonal(a, axis1=-2, axis2=-1)
    if mode == "full":
        return a.reshape(*a.shape[:-2], -1)
    raise ValueError(f"mode must be 'diag' or 'full', got {mode!r}")


@quiet
def pearson_np(a: npt.ArrayLike, b: npt.ArrayLike, *, mode: Mode = "diag") -> FloatArray:
    """Pearson correlation of two batches of matrices over the last two axes.

    Parameters
    ----------
    a, b : array_like, shape (..., m, m) for ``"diag"``, (..., m, n) for ``"full"``
        Matrices (batch axes broadcast).
    mode : {"diag", "full"}
        Correlate the diagonal entries, or all entries.

    Returns
    -------
    numpy.ndarray, shape (...)
        In ``[-1, 1]``; NaN when either side is constant (0/0) or has a NaN/Inf.

    Examples
    --------
    >>> a = [[1.0, 0.0], [0.0, 2.0]]
    >>> float(pearson_np(a, [[2.0, 5.0], [5.0, 4.0]]))
    1.0
    >>> round(float(pearson_np(a, [[2.0, 5.0], [5.0, 4.0]], mode="full")), 6)
    -0.492366
    """
    x = _entries(as_float64(a), mode)
    y = _entries(as_float64(b), mode)
    x, y = np.broadcast_arrays(x, y)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    num = np.sum(xc * yc, axis=-1)
    den = np.sqrt(np.sum(xc * xc, axis=-1) * np.sum(yc * yc, axis=-1))
    return mask_nonfinite(num / den, 0, (x, 1), (y, 1))


@quiet
def cosine_np(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Cosine similarity ``<A, B>_F / (||A||_F ||B||_F)`` over the last two axes.

    Parameters
    ----------
    a, b : array_like, shape (..., m, n)
        Batch axes broadcast.

    Returns
    -------
    numpy.ndarray, shape (...)
        NaN when either side is zero or has a NaN/Inf.

    Examples
    --------
    >>> float(cosine_np([[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]))
    0.7071067811865475
    """
    x, y = as_float64(a), as_float64(b)
    num = np.sum(x * y, axis=(-2, -1))
    den = np.sqrt(np.sum(x * x, axis=(-2, -1)) * np.sum(y * y, axis=(-2, -1)))
    return mask_nonfinite(num / den, 0, (x, 2), (y, 2))


@quiet
def norm_ratio_np(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """``||A||_F / ||B||_F`` over the last two axes.

    Parameters
    ----------
    a, b : array_like, shape (..., m, n)
        Batch axes broadcast.

    Returns
    -------
    numpy.ndarray, shape (...)
        NaN when ``b`` is zero or a NaN/Inf is present.

    Examples
    --------
    >>> float(norm_ratio_np([[3.0, 4.0]], [[1.0, 0.0]]))
    5.0
    """
    x, y = as_float64(a), as_float64(b)
    ratio = np.sqrt(np.sum(x * x, axis=(-2, -1)) / np.sum(y * y, axis=(-2, -1)))
    return mask_nonfinite(ratio, 0, (x, 2), (y, 2))


def pearson(
    a: xr.DataArray,
    b: xr.DataArray,
    *,
    mode: Mode = "diag",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """Pearson correlation between two matrices, e.g. ``W^T W`` and the VC.

    Parameters
    ----------
    a, b : xarray.DataArray
        Matrices over ``dims`` (leading dims broadcast; coordinates paired by
        an inner join).
    mode : {"diag", "full"}
        ``"diag"`` (default, the paper's): diagonal entries only;
        ``"full"``: all entries.

    Returns
    -------
    xarray.DataArray
        Over the shared leading dims.

    Examples
    --------
    >>> import xarray as xr
    >>> a = xr.DataArray([[1.0, 0.0], [0.0, 2.0]], dims=("in_i", "in_j"))
    >>> b = xr.DataArray([[2.0, 5.0], [5.0, 4.0]], dims=("in_i", "in_j"))
    >>> float(pearson(a, b))
    1.0
    """
    require_dims(a, dims, "a")
    require_dims(b, dims, "b")
    _entries(np.zeros((1, 1)), mode)
    out = apply(pearson_np, a, b, input_core_dims=[dims, dims], kwargs={"mode": mode}, join="inner")
    out.attrs.update(long_name=f"Pearson correlation ({mode})", mode=mode)
    return out


def cosine_similarity(
    a: xr.DataArray, b: xr.DataArray, *, dims: tuple[Hashable, Hashable] = SQUARE
) -> xr.DataArray:
    """Cosine similarity ``<A, B>_F / (||A||_F ||B||_F)`` of two matrices.

    Parameters
    ----------
    a, b : xarray.DataArray
        Matrices over ``dims``; leading dims paired by coordinates (inner join).

    Returns
    -------
    xarray.DataArray

    Examples
    --------
    >>> import xarray as xr
    >>> a = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("in_i", "in_j"))
    >>> round(float(cosine_similarity(a, 2 * a)), 12)
    1.0
    """
    require_dims(a, dims, "a")
    require_dims(b, dims, "b")
    out = apply(cosine_np, a, b, input_core_dims=[dims, dims], join="inner")
    out.attrs["long_name"] = "cosine similarity"
    return out


def vcs_interval_consistency(
    gram: xr.DataArray,
    vcs: xr.DataArray,
    *,
    step_dim: Hashable = "step",
    mode: Mode = "full",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.Dataset:
    """Whether checkpoints are dense enough for the trapezoid VCS estimate.

    For each interval of consecutive steps ``a < b`` compares the actual
    change ``W_b^T W_b - W_a^T W_a`` with its estimate
    ``(b - a)(VCS_a + VCS_b)/2``.

    Parameters
    ----------
    gram : xarray.DataArray
        ``W^T W`` per step, dims ``(step_dim, ..., *dims)``.
    vcs : xarray.DataArray
        VCS per step on the same steps (coordinates must match exactly).
    mode : {"full", "diag"}
        Pearson mode; MATH.md specifies ``"full"`` for this check.

    Returns
    -------
    xarray.Dataset
        Per interval (labelled by its end ``b``; coordinates ``{step_dim}_start``
        and ``{step_dim}_end``):

        ``vcs_interval_corr``
            Pearson correlation between actual and estimate.
        ``vcs_interval_ratio``
            ``||estimate||_F / ||actual||_F``: 1 when the estimate has the right
            size. On the digits run of MATH.md it is about 1 while the first-order
            picture holds and 2-8 afterwards, as MATH.md reports.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> steps = {"step": [0, 10]}
    >>> g = xr.DataArray(np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 1.0], [1.0, 7.0]]]),
    ...                  dims=("step", "in_i", "in_j"), coords=steps)
    >>> v = xr.DataArray(np.array([[[0.1, 0.05], [0.05, 0.3]]] * 2),
    ...                  dims=("step", "in_i", "in_j"), coords=steps)
    >>> res = vcs_interval_consistency(g, v)
    >>> round(float(res.vcs_interval_corr[0]), 12), round(float(res.vcs_interval_ratio[0]), 12)
    (1.0, 0.5)
    """
    require_dims(gram, [step_dim, *dims], "gram")
    require_dims(vcs, [step_dim, *dims], "vcs")
    gram, vcs = xr.align(gram, vcs, join="exact")
    template, b, a, _ = _step_pairs(gram, step_dim)
    actual = template.copy(data=b - a)
    estimate = interval_vcs(vcs, step_dim=step_dim)
    corr = apply(pearson_np, actual, estimate, input_core_dims=[dims, dims], kwargs={"mode": mode})
    ratio = apply(norm_ratio_np, estimate, actual, input_core_dims=[dims, dims])
    corr.attrs.update(
        long_name=f"Pearson ({mode}) of W_b^T W_b - W_a^T W_a with (b - a)(VCS_a + VCS_b)/2",
        mode=mode,
    )
    ratio.attrs.update(
        long_name="||(b - a)(VCS_a + VCS_b)/2||_F / ||W_b^T W_b - W_a^T W_a||_F",
        direction="estimate / actual",
    )
    return xr.Dataset({"vcs_interval_corr": corr, "vcs_interval_ratio": ratio})
