"""Gram matrices of weights and their change between steps.

A layer's weight ``W`` has dims ``(..., "out", "in")``; its Gram matrix
``W^T W`` has dims ``("in_i", "in_j")`` (two distinct names for the two sides
of a square matrix) and ``W W^T`` has dims ``("out_i", "out_j")``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import numpy as np
import numpy.typing as npt

from gramlin_analyze.reducers._common import (
    FloatArray,
    as_float64,
    batch_bad,
    from_stats,
    poison,
    quiet,
    require_dims,
    stream_sum,
    sym,
    xr,
)

__all__ = ["gram_np", "gram", "gram_change"]

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
    out = from_stats(stats.data.reshape(*stats.shape[:-1], d, d), stats, dims)
    if kept in W.coords:
        out = out.assign_coords({dims[0]: W[kept].values, dims[1]: W[kept].values})
    out.attrs["long_name"] = "W^T W" if side == "in" else "W W^T"
    return out


def check_steps(da: xr.DataArray, step_dim: Hashable) -> np.ndarray:
    """The step coordinate as float64, checked strictly increasing.

    Parameters
    ----------
    da : xarray.DataArray
        An array with a ``step_dim`` dim (without a coordinate, steps are 0, 1, ...).
    step_dim : hashable

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> import xarray as xr
    >>> check_steps(xr.DataArray([1.0, 2.0], dims="step", coords={"step": [0, 50]}), "step")
    array([ 0., 50.])
    """
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
