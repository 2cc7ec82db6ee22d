"""TL surrogate and kernel-target alignment of the next pre-activation ``Z = H W^T``.

``S = ||Z^T Y_c||_F^2 / C`` and the scale-free kernel-target alignment
``||Z^T Y_c||_F^2 / (||Z^T Z||_F ||Y_c^T Y_c||_F)`` (MATH.md, "Surrogate"),
from the streamed TL statistics: ``Z^T Y_c = W H^T Y_c`` and
``Z^T Z = W H^T H W^T``, so the ``N x N`` kernel is never built.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

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
from gramlin_analyze.reducers._tl_solve import centered_target_gram_norm, pca_project
from gramlin_analyze.reducers.target_linearity import streamed_tl_stats

__all__ = ["tl_surrogate", "surrogate_from_stats_np"]


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _per_position(w: np.ndarray, x: np.ndarray, positions: int, right: bool) -> np.ndarray:
    """``kron(I_P, W) @ x`` (and ``@ kron(I_P, W)^T`` when ``right``) without the Kronecker
    product: features are position-major blocks of ``W``'s inputs (one sample per image)."""
    p, (do, d) = positions, w.shape[-2:]
    lead = x.shape[: x.ndim - 2]
    if right:  # x is (P d, P d): (P, d, P, d) -> W on both sides of every block
        xb = x.reshape(lead + (p, d, p, d)) @ _t(w)[..., None, None, :, :]
        out = np.einsum("...od,...pdqf->...poqf", w, xb)
        return out.reshape(lead + (p * do, p * do))
    xb = x.reshape(lead + (p, d, x.shape[-1]))
    return (w[..., None, :, :] @ xb).reshape(lead + (p * do, x.shape[-1]))


@quiet
def surrogate_from_stats_np(
    s: Mapping[str, np.ndarray],
    w: np.ndarray,
    *,
    positions: int = 1,
    pca_components: int | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Surrogate and kernel-target alignment from TL's statistics ``s`` (unpacked).

    ``positions > 1``: the features are ``positions`` blocks of ``W``'s inputs (one
    sample per image, the paper's convention for conv layers), so ``Z`` holds every
    position's pre-activation. ``pca_components``: ``Z`` is first projected onto its
    top principal axes (exact, of the centered ``Z``), as the paper's code does.
    """
    n = as_float64(s["n"])[..., 0]
    w = as_float64(w)
    c = s["sum_y"].shape[-1]
    b = s["hy"] - s["sum_h"][..., :, None] * (s["sum_y"] / n[..., None])[..., None, :]
    if positions > 1:
        zy = _per_position(w, b, positions, False)
        sz = _per_position(w, s["sum_h"][..., :, None], positions, False)[..., 0]
        zz = _per_position(w, s["hh"], positions, True)
    else:
        zy, sz, zz = w @ b, (w @ s["sum_h"][..., :, None])[..., 0], w @ s["hh"] @ _t(w)
    if pca_components is not None and pca_components < zz.shape[-1]:
        zz, sz, zy = pca_project(zz, sz, zy, n, int(pca_components))
    num = np.sum(zy * zy, axis=(-2, -1))
    kta = num / (np.sqrt(np.sum(zz * zz, axis=(-2, -1))) * centered_target_gram_norm(s, n))
    return num / c, kta


@quiet
def _surrogate_np(
    stats: np.ndarray,
    w: np.ndarray,
    layout: list,
    positions: int = 1,
    pca_components: int | None = None,
) -> tuple[FloatArray, FloatArray]:
    s = unpack(as_float64(stats), layout)
    bad = batch_bad(as_float64(w), 2)
    s_val, kta = surrogate_from_stats_np(
        s,
        np.where(bad[..., None, None], 0.0, w),
        positions=positions,
        pca_components=pca_components,
    )
    return np.where(bad, np.nan, s_val), np.where(bad, np.nan, kta)


def tl_surrogate(
    h: xr.DataArray,
    W: xr.DataArray,
    *,
    labels: xr.DataArray | None = None,
    targets: xr.DataArray | None = None,
    n_classes: int | None = None,
    pca: bool = False,
    pca_components: int = 256,
    pca_cap: int = 1000,
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
    pca, pca_components, pca_cap
        When ``pca`` and ``Z`` has more than ``pca_cap`` columns, project ``Z`` onto
        its top ``pca_components`` principal axes first (the paper's code: 1000, 256).

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
    d_out = W.sizes[out_dim]
    k = int(pca_components) if pca and d_out > pca_cap and pca_components < d_out else None
    s, kta = apply(
        _surrogate_np,
        stats,
        W,
        input_core_dims=[[STAT_DIM], [out_dim, in_dim]],
        output_core_dims=[[], []],
        kwargs={"layout": layout, "pca_components": k},
    )
    s.attrs["long_name"] = "TL surrogate ||Z^T Y_c||_F^2 / C"
    kta.attrs["long_name"] = "kernel-target alignment ||Z^T Y_c||^2 / (||Z^T Z|| ||Y_c^T Y_c||)"
    for a in (s, kta):
        a.attrs.update(
            pca_applied=int(k is not None), **({} if k is None else {"pca_components": k})
        )
    return xr.Dataset({"tl_surrogate": s, "kernel_target_alignment": kta})
