"""Virtual covariance (VC), its shift (VCS), and the Feature Learning Equation terms.

For a layer with input ``h`` and gradient ``g = W^T dL/dz`` (both with dims
``(..., "sample", "in")``) and learning rate ``gamma``:

* ``VC  = sum_i (h_i - gamma g_i)(h_i - gamma g_i)^T`` (uncentered),
* ``VCS = VC - sum_i h_i h_i^T = -gamma sum_i (g_i h_i^T + h_i g_i^T) + gamma^2 sum_i g_i g_i^T``,

both computed from the streamed sufficient statistics ``sum h h^T``,
``sum g h^T`` and ``sum g g^T`` (summed over sample blocks). Square results
have dims ``("in_i", "in_j")``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

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
    pack,
    poison,
    quiet,
    require_dims,
    stream_sum,
    sym,
    unpack,
    xr,
)
from gramlin_analyze.reducers.gram import check_steps

__all__ = [
    "vc_stats_np",
    "virtual_covariance_np",
    "vcs_np",
    "accumulate_trapezoid_np",
    "vc_stats",
    "virtual_covariance",
    "virtual_covariance_shift",
    "accumulated_vcs",
    "interval_vcs",
]

SQUARE = ("in_i", "in_j")


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


@quiet
def vc_stats_np(
    h: npt.ArrayLike, g: npt.ArrayLike, *, hh: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Sufficient statistics of the virtual covariance over the sample axis.

    Parameters
    ----------
    h, g : array_like, shape (..., n_samples, d)
        Layer inputs and their gradients through the layer.
    hh : numpy.ndarray, optional
        ``sym(h^T h)`` of these rows when the caller already has it (shared
        among the families that stream the same block).

    Returns
    -------
    sum_hh, sum_gh, sum_gg : numpy.ndarray, shape (..., d, d)
        ``sum_i h_i h_i^T``, ``sum_i g_i h_i^T`` (entry ``[a, b] = sum_i g_ia h_ib``)
        and ``sum_i g_i g_i^T``; all NaN for a batch entry holding a NaN/Inf.

    Examples
    --------
    >>> hh, gh, gg = vc_stats_np([[1.0, 0.0]], [[0.0, 2.0]])
    >>> gh
    array([[0., 0.],
           [2., 0.]])
    """
    h, g = as_float64(h), as_float64(g)
    bad = batch_bad(h, 2) | batch_bad(g, 2)
    hh = poison(sym(_t(h) @ h) if hh is None else hh, bad, 2)
    gh = poison(_t(g) @ h, bad, 2)
    gg = poison(sym(_t(g) @ g), bad, 2)
    return hh, gh, gg


@quiet
def virtual_covariance_np(
    sum_hh: npt.ArrayLike, sum_gh: npt.ArrayLike, sum_gg: npt.ArrayLike, gamma: npt.ArrayLike
) -> FloatArray:
    """``VC = sum_hh - gamma (sum_gh + sum_gh^T) + gamma^2 sum_gg``.

    ``gamma`` broadcasts against the leading (batch) axes.

    Parameters
    ----------
    sum_hh, sum_gh, sum_gg : array_like, shape (..., d, d)
        Statistics of :func:`vc_stats_np`.
    gamma : array_like
        Learning rate.

    Returns
    -------
    numpy.ndarray, shape (..., d, d)

    Examples
    --------
    >>> virtual_covariance_np([[1.0]], [[2.0]], [[3.0]], 0.5)
    array([[-0.25]])
    """
    hh = as_float64(sum_hh)
    return mask_nonfinite(hh + vcs_np(sum_gh, sum_gg, gamma), 2, (hh, 2))


@quiet
def vcs_np(
    sum_gh: npt.ArrayLike,
    sum_gg: npt.ArrayLike,
    gamma: npt.ArrayLike,
    *,
    gg_scale: npt.ArrayLike = 1.0,
) -> FloatArray:
    """``VCS = -gamma (sum_gh + sum_gh^T) + gg_scale gamma^2 sum_gg``.

    ``gg_scale = N / b`` gives the expected per-step VCS of minibatch
    training with batch size ``b`` (see :func:`virtual_covariance_shift`).

    Parameters
    ----------
    sum_gh, sum_gg : array_like, shape (..., d, d)
        Statistics of :func:`vc_stats_np`.
    gamma : array_like
        Learning rate.
    gg_scale : array_like
        Factor of the second-order term.

    Returns
    -------
    numpy.ndarray, shape (..., d, d)

    Examples
    --------
    >>> vcs_np([[2.0]], [[3.0]], 0.5)
    array([[-1.25]])
    """
    gh, gg, gam, scale = (as_float64(x) for x in (sum_gh, sum_gg, gamma, gg_scale))
    out = (
        -gam[..., None, None] * (gh + _t(gh))
        + scale[..., None, None] * gam[..., None, None] ** 2 * gg
    )
    return mask_nonfinite(out, 2, (gh, 2), (gg, 2), (gam, 0), (scale, 0))


@quiet
def accumulate_trapezoid_np(y: npt.ArrayLike, x: npt.ArrayLike) -> FloatArray:
    """Cumulative trapezoid rule along the last axis, 0 at the first point.

    For consecutive points ``a < b`` adds ``(x_b - x_a) (y_a + y_b) / 2``.
    A NaN/Inf at one point makes every later value NaN (never skipped).

    Parameters
    ----------
    y : array_like, shape (..., n_points)
    x : array_like, shape (n_points,)
        Increasing abscissae (steps).

    Returns
    -------
    numpy.ndarray, shape (..., n_points)

    Examples
    --------
    >>> accumulate_trapezoid_np([1.0, 3.0, 3.0], [0, 10, 30])
    array([ 0., 20., 80.])
    """
    return _cumulative_trapezoid(as_float64(y), as_float64(x))


def _cumulative_trapezoid(y: Any, x: FloatArray) -> Any:
    # NumPy functions only, so a Dask array stays lazy (``__array_function__``).
    inc = 0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(x)
    inc = np.where(np.isfinite(inc), inc, np.nan)  # an Inf VCS is as unusable as a NaN
    return np.concatenate([np.zeros_like(y[..., :1]), np.cumsum(inc, axis=-1)], axis=-1)


# ----------------------------------------------------------------------------
# xarray wrappers
# ----------------------------------------------------------------------------


def _layout(d: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("sum_hh", (d, d)), ("sum_gh", (d, d)), ("sum_gg", (d, d))]


def _vc_block(h: np.ndarray, g: np.ndarray) -> FloatArray:
    hh, gh, gg = vc_stats_np(h, g)
    d = h.shape[-1]
    return pack({"sum_hh": hh, "sum_gh": gh, "sum_gg": gg}, _layout(d), hh.shape[:-2])


def _square(
    data: Any,
    stats: xr.DataArray,
    dims: tuple[Hashable, Hashable],
    h: xr.DataArray,
    in_dim: Hashable,
) -> xr.DataArray:
    out = from_stats(data, stats, dims)
    if in_dim in h.coords:
        out = out.assign_coords({dims[0]: h[in_dim].values, dims[1]: h[in_dim].values})
    return out


def vc_stats(
    h: xr.DataArray,
    g: xr.DataArray,
    *,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
    split_every: int | None = None,
) -> xr.Dataset:
    """Streamed sufficient statistics ``sum h h^T``, ``sum g h^T``, ``sum g g^T``.

    Parameters
    ----------
    h, g : xarray.DataArray
        Layer inputs and gradients, dims ``(..., sample_dim, in_dim)``; NumPy
        or Dask backed. With Dask, each sample chunk is reduced on its own and
        the partial sums are added by a tree reduction (``split_every``).
    dims : tuple of two hashables
        Dims of the square results.

    Returns
    -------
    xarray.Dataset
        ``sum_hh``, ``sum_gh`` (entry ``[a, b] = sum_i g_ia h_ib``) and ``sum_gg``.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("sample", "in"))
    >>> vc_stats(h, 2 * h).sum_gh.values
    array([[2., 0.],
           [0., 2.]])
    """
    require_dims(h, [sample_dim, in_dim], "h")
    require_dims(g, [sample_dim, in_dim], "g")
    d = h.sizes[in_dim]
    if g.sizes[in_dim] != d:
        raise ValueError(f"h and g have {d} and {g.sizes[in_dim]} features")
    stats = stream_sum(
        _vc_block,
        [h, g],
        reduce_dim=sample_dim,
        core_dims=[[in_dim], [in_dim]],
        size=3 * d * d,
        split_every=split_every,
    )
    parts = unpack(stats.data, _layout(d))
    long = {"sum_hh": "sum_i h_i h_i^T", "sum_gh": "sum_i g_i h_i^T", "sum_gg": "sum_i g_i g_i^T"}
    ds = xr.Dataset({k: _square(v, stats, dims, h, in_dim) for k, v in parts.items()})
    for k in ds:
        ds[k].attrs["long_name"] = long[str(k)]
    return ds


def virtual_covariance(
    h: xr.DataArray,
    g: xr.DataArray,
    gamma: float | xr.DataArray,
    *,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """Uncentered virtual covariance ``sum_i (h_i - gamma g_i)(h_i - gamma g_i)^T``.

    Parameters
    ----------
    h, g : xarray.DataArray
        Layer inputs and gradients ``g = W^T dL/dz``, dims ``(..., sample, in)``.
    gamma : float or xarray.DataArray
        Learning rate; a DataArray (e.g. ``lr`` along ``step``) broadcasts
        against the leading dims.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., *dims)``.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("sample", "in"))
    >>> virtual_covariance(h, h, 0.5).values
    array([[0.25, 0.  ],
           [0.  , 0.25]])
    """
    s = vc_stats(h, g, sample_dim=sample_dim, in_dim=in_dim, dims=dims)
    out = apply(
        virtual_covariance_np,
        s.sum_hh,
        s.sum_gh,
        s.sum_gg,
        gamma_array(gamma),
        input_core_dims=[dims, dims, dims, []],
        output_core_dims=[dims],
    )
    out.attrs["long_name"] = "virtual covariance sum_i (h_i - gamma g_i)(h_i - gamma g_i)^T"
    return out


def virtual_covariance_shift(
    h: xr.DataArray,
    g: xr.DataArray,
    gamma: float | xr.DataArray,
    *,
    batch_size: int | None = None,
    n_samples: int | None = None,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """Virtual covariance shift ``-gamma sum (g h^T + h g^T) + gamma^2 sum g g^T``.

    Parameters
    ----------
    h, g : xarray.DataArray
        Layer inputs and gradients, dims ``(..., sample, in)``.
    gamma : float or xarray.DataArray
        Learning rate (broadcast against the leading dims).
    batch_size : int, optional
        Training batch size ``b``. When given, the second-order term is scaled
        by ``N / b``: ``gamma^2 (N/b) sum g g^T`` is the expected per-step
        second-order term of a minibatch step (mean-reduced loss), so the
        result estimates the expected VCS of one minibatch step.
    n_samples : int, optional
        ``N`` for that scaling; default the size of ``sample_dim`` (the probe
        set should then be the training set or a sample of it).

    Returns
    -------
    xarray.DataArray
        Dims ``(..., *dims)``; ``attrs`` record the minibatch scaling.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0], [1.0]], dims=("sample", "in"))
    >>> float(virtual_covariance_shift(h, h, 0.5).squeeze())
    -1.5
    >>> float(virtual_covariance_shift(h, h, 0.5, batch_size=1).squeeze())
    -1.0
    """
    s = vc_stats(h, g, sample_dim=sample_dim, in_dim=in_dim, dims=dims)
    scale = 1.0
    if batch_size is not None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = h.sizes[sample_dim] if n_samples is None else int(n_samples)
        scale = n / batch_size
    out = apply(
        vcs_np,
        s.sum_gh,
        s.sum_gg,
        gamma_array(gamma),
        input_core_dims=[dims, dims, []],
        output_core_dims=[dims],
        kwargs={"gg_scale": scale},
    )
    out.attrs["long_name"] = "virtual covariance shift"
    if batch_size is not None:
        out.attrs["second_order_scale"] = scale
        out.attrs["batch_size"] = int(batch_size)
    return out


def _step_pairs(da: xr.DataArray, step_dim: Hashable) -> tuple[xr.DataArray, Any, Any, FloatArray]:
    """``(template labelled by interval end, data at b, data at a, b - a)`` along ``step_dim``."""
    steps = check_steps(da, step_dim)
    n = da.sizes[step_dim]
    upper = da.isel({step_dim: slice(1, None)})
    lower = da.isel({step_dim: slice(None, n - 1)})
    labels = da[step_dim].values if step_dim in da.coords else np.arange(n)
    upper = upper.assign_coords(
        {f"{step_dim}_start": (step_dim, labels[:-1]), f"{step_dim}_end": (step_dim, labels[1:])}
    )
    width = np.diff(steps).reshape([-1 if d == step_dim else 1 for d in da.dims])
    return upper, upper.data, lower.data, width


def interval_vcs(vcs: xr.DataArray, *, step_dim: Hashable = "step") -> xr.DataArray:
    """Trapezoid estimate ``(b - a)(VCS_a + VCS_b)/2`` of the VCS summed over each interval.

    One entry per interval of consecutive steps ``a < b``, labelled by ``b``,
    with non-dim coordinates ``{step_dim}_start`` and ``{step_dim}_end``.

    Parameters
    ----------
    vcs : xarray.DataArray
        VCS per step, dims ``(step_dim, ...)``, strictly increasing steps.

    Returns
    -------
    xarray.DataArray
        ``n_steps - 1`` intervals.

    Examples
    --------
    >>> import xarray as xr
    >>> v = xr.DataArray([1.0, 3.0, 3.0], dims="step", coords={"step": [0, 10, 30]})
    >>> interval_vcs(v).values
    array([20., 60.])
    """
    template, b, a, width = _step_pairs(vcs, step_dim)
    out = template.copy(data=0.5 * (a + b) * width)
    out.attrs = {
        "long_name": "VCS summed over the interval (trapezoid estimate)",
        "estimate": "trapezoid rule over checkpoint steps: (b - a)(VCS_a + VCS_b)/2",
    }
    return out


def accumulated_vcs(vcs: xr.DataArray, *, step_dim: Hashable = "step") -> xr.DataArray:
    """VCS accumulated over the trajectory by the trapezoid rule (an estimate).

    The value at step ``s`` is the sum over consecutive checkpoints ``a < b <= s``
    of ``(b - a)(VCS_a + VCS_b)/2``; 0 at the first step. It estimates the
    VCS summed over every optimizer step, which the paper compares with
    ``W^T W`` (``attrs["estimate"]`` says so). A NaN at one step makes every
    later value NaN.

    Parameters
    ----------
    vcs : xarray.DataArray
        VCS per step, dims ``(step_dim, ...)``; the step coordinate must be
        strictly increasing. Dask-backed input stays lazy.

    Returns
    -------
    xarray.DataArray
        Same dims and steps as ``vcs``.

    Examples
    --------
    >>> import xarray as xr
    >>> v = xr.DataArray([1.0, 3.0, 3.0], dims="step", coords={"step": [0, 10, 30]})
    >>> accumulated_vcs(v).values
    array([ 0., 20., 80.])
    """
    steps = check_steps(vcs, step_dim)
    moved = vcs.transpose(..., step_dim)
    data = moved.data if hasattr(moved.data, "dask") else as_float64(moved.data)
    out = moved.copy(data=_cumulative_trapezoid(data, steps)).transpose(*vcs.dims)
    out.attrs = {
        "long_name": "accumulated virtual covariance shift",
        "estimate": "trapezoid rule over checkpoint steps of the per-step VCS on the probe set; "
        "an estimate of the VCS summed over every optimizer step",
    }
    return out
