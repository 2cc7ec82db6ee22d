"""Linear CKA between two feature sets on the same samples.

``CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with
column-centered ``X_c, Y_c`` (equal to the HSIC form on ``N x N`` kernels,
which is never built). Computed from additive statistics summed over sample
blocks: ``N``, ``sum X``, ``sum Y``, ``X^T X``, ``Y^T Y``, ``Y^T X``; centering
is an algebraic correction of those sums.

``X`` has dims ``(..., "sample", x_dim)`` and ``Y`` ``(..., "sample", y_dim)``;
the feature dims may share a name and differ in size (two layers). Leading
dims broadcast: to compare every pair of steps of one layer, rename one
copy's step dim, e.g. ``linear_cka(h, h.rename(step="step_j"))``.
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
    layout_size,
    mask_nonfinite,
    pack,
    poison,
    quiet,
    require_dims,
    stream_sum,
    sym,
    unpack,
    xr,
)

__all__ = ["cka_stats_np", "linear_cka_from_stats_np", "linear_cka_np", "linear_cka"]


def _layout(dx: int, dy: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("n", (1,)),
        ("sum_x", (dx,)),
        ("sum_y", (dy,)),
        ("xx", (dx, dx)),
        ("yy", (dy, dy)),
        ("yx", (dy, dx)),
    ]


_CORE = {"n": 1, "sum_x": 1, "sum_y": 1, "xx": 2, "yy": 2, "yx": 2}


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


@quiet
def cka_stats_np(
    x: npt.ArrayLike, y: npt.ArrayLike, *, xx: FloatArray | None = None
) -> dict[str, FloatArray]:
    """Additive statistics of linear CKA over the sample axis.

    Parameters
    ----------
    x : array_like, shape (..., n_samples, d_x)
    y : array_like, shape (..., n_samples, d_y)
    xx : numpy.ndarray, optional
        ``sym(x^T x)`` when the caller already has it.

    Returns
    -------
    dict of numpy.ndarray
        ``n``, ``sum_x``, ``sum_y``, ``xx = X^T X``, ``yy = Y^T Y``, ``yx = Y^T X``.

    Examples
    --------
    >>> cka_stats_np([[1.0], [2.0]], [[3.0], [4.0]])["yx"]
    array([[11.]])
    """
    x, y = as_float64(x), as_float64(y)
    lead = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    bad = np.broadcast_to(batch_bad(x, 2) | batch_bad(y, 2), lead)
    parts = {
        "n": np.full((1,), float(x.shape[-2])),
        "sum_x": x.sum(axis=-2),
        "sum_y": y.sum(axis=-2),
        "xx": sym(_t(x) @ x) if xx is None else xx,
        "yy": sym(_t(y) @ y),
        "yx": _t(y) @ x,
    }
    return {
        k: poison(np.array(np.broadcast_to(v, lead + v.shape[v.ndim - _CORE[k] :])), bad, _CORE[k])
        for k, v in parts.items()
    }


@quiet
def linear_cka_from_stats_np(stats: Mapping[str, npt.ArrayLike]) -> FloatArray:
    """Linear CKA from summed statistics; NaN when either side is constant.

    Parameters
    ----------
    stats : mapping
        Summed :func:`cka_stats_np` statistics.

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> s = cka_stats_np([[1.0], [2.0], [4.0]], [[2.0], [4.0], [8.0]])
    >>> round(float(linear_cka_from_stats_np(s)), 12)
    1.0
    """
    s = {k: as_float64(v) for k, v in stats.items()}
    n = s["n"][..., 0][..., None, None]
    sx, sy = s["sum_x"], s["sum_y"]
    xx = s["xx"] - sx[..., :, None] * sx[..., None, :] / n
    yy = s["yy"] - sy[..., :, None] * sy[..., None, :] / n
    yx = s["yx"] - sy[..., :, None] * sx[..., None, :] / n
    num = np.sum(yx * yx, axis=(-2, -1))
    den = np.sqrt(np.sum(xx * xx, axis=(-2, -1))) * np.sqrt(np.sum(yy * yy, axis=(-2, -1)))
    return mask_nonfinite(num / den, 0, *((s[k], _CORE[k]) for k in _CORE))


def linear_cka_np(x: npt.ArrayLike, y: npt.ArrayLike) -> FloatArray:
    """Linear CKA of ``x`` (..., n, d_x) and ``y`` (..., n, d_y).

    Parameters
    ----------
    x : array_like, shape (..., n_samples, d_x)
    y : array_like, shape (..., n_samples, d_y)

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> round(float(linear_cka_np([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0], [0.0], [1.0]])), 6)
    0.790569
    """
    return linear_cka_from_stats_np(cka_stats_np(x, y))


def linear_cka(
    X: xr.DataArray,
    Y: xr.DataArray,
    *,
    sample_dim: Hashable = "sample",
    x_dim: Hashable = "in",
    y_dim: Hashable = "in",
) -> xr.DataArray:
    """Linear CKA between two feature sets whose samples correspond.

    Parameters
    ----------
    X, Y : xarray.DataArray
        Features with dims ``(..., sample_dim, x_dim)`` and
        ``(..., sample_dim, y_dim)``; NumPy or Dask backed (streamed over
        sample chunks). Leading dims broadcast against each other.

    Returns
    -------
    xarray.DataArray
        CKA in ``[0, 1]`` over the union of leading dims.

    Examples
    --------
    >>> import xarray as xr
    >>> X = xr.DataArray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dims=("sample", "in"))
    >>> round(float(linear_cka(X, X)), 12)
    1.0
    """
    require_dims(X, [sample_dim, x_dim], "X")
    require_dims(Y, [sample_dim, y_dim], "Y")
    layout = _layout(X.sizes[x_dim], Y.sizes[y_dim])

    def block(xb: np.ndarray, yb: np.ndarray) -> FloatArray:
        parts = cka_stats_np(xb, yb)
        return pack(parts, layout, parts["n"].shape[:-1])

    stats = stream_sum(
        block, [X, Y], reduce_dim=sample_dim, core_dims=[[x_dim], [y_dim]], size=layout_size(layout)
    )

    def finish(st: np.ndarray) -> FloatArray:
        return linear_cka_from_stats_np(unpack(as_float64(st), layout))

    out = apply(finish, stats, input_core_dims=[[STAT_DIM]])
    out.attrs["long_name"] = "linear CKA"
    return out
