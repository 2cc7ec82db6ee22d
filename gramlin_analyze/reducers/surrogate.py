"""TL surrogate and kernel-target alignment of the next pre-activation ``Z = H W^T``.

``S = ||Z^T Y_c||_F^2 / C`` and the scale-free kernel-target alignment
``||Z^T Y_c||_F^2 / (||Z^T Z||_F ||Y_c^T Y_c||_F)`` (MATH.md, "Surrogate"),
from the streamed TL statistics: ``Z^T Y_c = W H^T Y_c`` and
``Z^T Z = W H^T H W^T``, so the ``N x N`` kernel is never built.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from gramlin_analyze.reducers._common import (
    STAT_DIM,
    FloatArray,
    apply,
    as_float64,
    batch_bad,
    quiet,
    require_dims,
    unpack,
    xr,
)
from gramlin_analyze.reducers._tl_solve import centered_target_gram_norm
from gramlin_analyze.reducers.target_linearity import streamed_tl_stats

__all__ = ["tl_surrogate"]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


@quiet
def _surrogate_np(stats: np.ndarray, w: np.ndarray, layout: list) -> tuple[FloatArray, FloatArray]:
    s = unpack(as_float64(stats), layout)
    n = s["n"][..., 0]
    w = as_float64(w)
    c = s["sum_y"].shape[-1]
    b = s["hy"] - s["sum_h"][..., :, None] * (s["sum_y"] / n[..., None])[..., None, :]
    zy = w @ b
    zz = w @ s["hh"] @ _t(w)
    num = np.sum(zy * zy, axis=(-2, -1))
    kta = num / (np.sqrt(np.sum(zz * zz, axis=(-2, -1))) * centered_target_gram_norm(s, n))
    bad = batch_bad(w, 2)
    return np.where(bad, np.nan, num / c), np.where(bad, np.nan, kta)


def tl_surrogate(
    h: xr.DataArray,
    W: xr.DataArray,
    *,
    labels: xr.DataArray | None = None,
    targets: xr.DataArray | None = None,
    n_classes: int | None = None,
    sample_dim: Hashable = "sample",
    in_dim: Hashable = "in",
    out_dim: Hashable = "out",
    target_dim: Hashable = "target",
) -> xr.Dataset:
    """TL surrogate ``S = ||Z^T Y_c||_F^2 / C`` and kernel-target alignment, ``Z = H W^T``.

    ``Z`` is the pre-activation computed by ``W`` from ``H`` (no bias).
    Kernel-target alignment is the scale-free variant
    ``||Z^T Y_c||_F^2 / (||Z^T Z||_F ||Y_c^T Y_c||_F)``. Both come from the
    same streamed statistics as TL (``Z^T Y_c = W H^T Y_c``,
    ``Z^T Z = W H^T H W^T``); the ``N x N`` kernel is never built.

    Parameters
    ----------
    h : xarray.DataArray
        Layer inputs, dims ``(..., sample_dim, in_dim)``.
    W : xarray.DataArray
        The weight applied to ``h``, dims ``(..., out_dim, in_dim)``.
    labels, targets, n_classes
        As in :func:`target_linearity`.

    Returns
    -------
    xarray.Dataset
        ``tl_surrogate`` and ``kernel_target_alignment``.

    Examples
    --------
    >>> import xarray as xr
    >>> h = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("sample", "in"))
    >>> W = xr.DataArray([[2.0, 0.0]], dims=("out", "in"))
    >>> res = tl_surrogate(h, W, labels=xr.DataArray([0, 1], dims="sample"))
    >>> float(res.tl_surrogate), float(res.kernel_target_alignment)
    (1.0, 0.5)
    """
    require_dims(W, [out_dim, in_dim], "W")
    if W.sizes[in_dim] != h.sizes.get(in_dim):
        raise ValueError(f"W has {W.sizes[in_dim]} inputs, h has {h.sizes.get(in_dim)} features")
    stats, layout = streamed_tl_stats(h, labels, targets, n_classes, sample_dim, in_dim, target_dim)
    s, kta = apply(
        _surrogate_np,
        stats,
        W,
        input_core_dims=[[STAT_DIM], [out_dim, in_dim]],
        output_core_dims=[[], []],
        kwargs={"layout": layout},
    )
    s.attrs["long_name"] = "TL surrogate ||Z^T Y_c||_F^2 / C"
    kta.attrs["long_name"] = "kernel-target alignment ||Z^T Y_c||^2 / (||Z^T Z|| ||Y_c^T Y_c||)"
    return xr.Dataset({"tl_surrogate": s, "kernel_target_alignment": kta})
