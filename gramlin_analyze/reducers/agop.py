"""Neural Feature Ansatz: the AGOP and its correlation with ``W^T W``.

``AGOP = (1/N) sum_i J_i^T J_i`` with ``J_i = d f(x_i) / d h_i`` (``C x d_in``)
for a layer with input ``h``. The Neural Feature Ansatz says ``W^T W`` is
close to ``AGOP`` (or to ``AGOP^(1/2)``); it is reported as a Pearson
correlation in ``"full"`` (all entries) and ``"diag"`` mode. Square matrices
have dims ``("in_i", "in_j")``; Jacobians have dims ``(..., "sample", "output", "in")``.
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
    eigh_desc,
    from_stats,
    poison,
    quiet,
    require_dims,
    stream_sum,
    sym,
    xr,
)
from gramlin_analyze.reducers.alignment import Mode, pearson_np
from gramlin_analyze.reducers.gram import gram_np

__all__ = [
    "agop_np",
    "psd_sqrt_np",
    "nfa_correlation_np",
    "agop",
    "nfa_correlation",
    "nfa_alignment",
]

SQUARE = ("in_i", "in_j")


@quiet
def agop_np(j: npt.ArrayLike, *, projections: bool = False) -> FloatArray:
    """Average gradient outer product ``(1/N) sum_i J_i^T J_i``.

    Parameters
    ----------
    j : array_like, shape (..., n_samples, n_outputs, d)
        Jacobians of the network outputs with respect to the layer input.
    projections : bool
        The outputs axis holds random projections ``J_i^T v`` (Rademacher
        ``v``) instead of Jacobian rows: average over them as well, giving
        the unbiased estimate ``(1/N) sum_i mean_v (J_i^T v)(J_i^T v)^T``.

    Returns
    -------
    numpy.ndarray, shape (..., d, d)

    Examples
    --------
    >>> agop_np([[[1.0, 0.0]], [[0.0, 2.0]]])
    array([[0.5, 0. ],
           [0. , 2. ]])
    """
    j = as_float64(j)
    n, c = j.shape[-3], j.shape[-2]
    flat = j.reshape(*j.shape[:-3], n * c, j.shape[-1])
    out = sym(np.swapaxes(flat, -1, -2) @ flat) / (n * (c if projections else 1))
    return poison(out, batch_bad(j, 3), 2)


@quiet
def psd_sqrt_np(a: npt.ArrayLike) -> FloatArray:
    """Square root of symmetric PSD matrices by ``eigh``, negative round-off clipped to 0.

    Parameters
    ----------
    a : array_like, shape (..., d, d)
        Symmetric PSD matrices (the symmetric part is used).

    Returns
    -------
    numpy.ndarray, shape (..., d, d)

    Examples
    --------
    >>> psd_sqrt_np([[4.0, 0.0], [0.0, 9.0]])
    array([[2., 0.],
           [0., 3.]])
    """
    w, v = eigh_desc(as_float64(a))
    root = np.sqrt(np.clip(w, 0.0, None))
    return sym((v * root[..., None, :]) @ np.swapaxes(v, -1, -2))


@quiet
def nfa_correlation_np(
    w: npt.ArrayLike, agop: npt.ArrayLike, *, mode: Mode = "full", sqrt: bool = False
) -> FloatArray:
    """Pearson correlation of ``W^T W`` with ``AGOP`` (or ``AGOP^(1/2)``).

    Parameters
    ----------
    w : array_like, shape (..., d_out, d_in)
    agop : array_like, shape (..., d_in, d_in)
    mode : {"full", "diag"}
    sqrt : bool
        Compare with the PSD square root of the AGOP.

    Returns
    -------
    numpy.ndarray, shape (...)

    Examples
    --------
    >>> w = [[1.0, 1.0], [0.0, 1.0]]
    >>> round(float(nfa_correlation_np(w, [[1.0, 1.0], [1.0, 2.0]])), 12)
    1.0
    """
    m = psd_sqrt_np(agop) if sqrt else as_float64(agop)
    return pearson_np(gram_np(w), m, mode=mode)


def agop(
    J: xr.DataArray,
    *,
    projections: bool = False,
    sample_dim: Hashable = "sample",
    output_dim: Hashable = "output",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """AGOP ``(1/N) sum_i J_i^T J_i`` from per-sample Jacobians, streamed over samples.

    Parameters
    ----------
    J : xarray.DataArray
        Jacobians, dims ``(..., sample_dim, output_dim, in_dim)``.
    projections : bool
        ``output_dim`` holds random projections ``J^T v``; see :func:`agop_np`.

    Returns
    -------
    xarray.DataArray
        Dims ``(..., *dims)``.

    Examples
    --------
    >>> import xarray as xr
    >>> J = xr.DataArray([[[1.0, 0.0]], [[0.0, 2.0]]], dims=("sample", "output", "in"))
    >>> agop(J).values
    array([[0.5, 0. ],
           [0. , 2. ]])
    """
    require_dims(J, [sample_dim, output_dim, in_dim], "J")
    d = J.sizes[in_dim]

    def block(jb: np.ndarray) -> FloatArray:
        # per block: sum of J^T J and the sample count, so the mean is exact after summing
        n = jb.shape[-3]
        total = agop_np(jb, projections=projections) * n
        count = np.full(total.shape[:-2] + (1,), float(n))
        return np.concatenate([total.reshape(*total.shape[:-2], -1), count], axis=-1)

    stats = stream_sum(
        block, [J], reduce_dim=sample_dim, core_dims=[[output_dim, in_dim]], size=d * d + 1
    )
    data = (
        stats.data[..., : d * d].reshape(*stats.shape[:-1], d, d) / stats.data[..., -1:][..., None]
    )
    out = from_stats(data, stats, dims)
    out.attrs["long_name"] = "average gradient outer product"
    if projections:
        out.attrs["estimate"] = "random-projection estimate E_v[(J^T v)(J^T v)^T]"
    return out


def nfa_correlation(
    W: xr.DataArray,
    agop: xr.DataArray,
    *,
    mode: Mode = "full",
    sqrt: bool = False,
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.DataArray:
    """Neural Feature Ansatz: Pearson correlation of ``W^T W`` with the AGOP.

    Parameters
    ----------
    W : xarray.DataArray
        Weights, dims ``(..., out_dim, in_dim)``.
    agop : xarray.DataArray
        AGOP of the layer input, dims ``(..., *dims)``; leading dims are
        paired with those of ``W`` by coordinates (inner join).
    mode : {"full", "diag"}
        All entries (default, the NFA papers') or the diagonal.
    sqrt : bool
        Correlate with ``AGOP^(1/2)`` (PSD square root).

    Returns
    -------
    xarray.DataArray
        Over the shared leading dims.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[1.0, 1.0], [0.0, 1.0]], dims=("out", "in"))
    >>> G = xr.DataArray([[1.0, 1.0], [1.0, 2.0]], dims=("in_i", "in_j"))
    >>> round(float(nfa_correlation(W, G)), 12)
    1.0
    """
    require_dims(W, [out_dim, in_dim], "W")
    require_dims(agop, dims, "agop")
    if W.sizes[in_dim] != agop.sizes[dims[0]]:
        raise ValueError(
            f"W has {W.sizes[in_dim]} inputs but the AGOP is {agop.sizes[dims[0]]} wide"
        )
    out = apply(
        nfa_correlation_np,
        W,
        agop,
        input_core_dims=[[out_dim, in_dim], dims],
        kwargs={"mode": mode, "sqrt": sqrt},
        join="inner",
    )
    out.attrs.update(
        long_name=f"Pearson ({mode}) of W^T W with {'AGOP^(1/2)' if sqrt else 'AGOP'}", mode=mode
    )
    return out


def nfa_alignment(
    W: xr.DataArray,
    agop: xr.DataArray,
    *,
    out_dim: Hashable = "out",
    in_dim: Hashable = "in",
    dims: tuple[Hashable, Hashable] = SQUARE,
) -> xr.Dataset:
    """All four NFA correlations: with ``AGOP`` and ``AGOP^(1/2)``, ``full`` and ``diag``.

    Returns
    -------
    xarray.Dataset
        ``nfa_corr_full``, ``nfa_corr_diag``, ``nfa_sqrt_corr_full``, ``nfa_sqrt_corr_diag``.

    Parameters
    ----------
    W, agop, out_dim, in_dim, dims
        As in :func:`nfa_correlation`.

    Examples
    --------
    >>> import xarray as xr
    >>> W = xr.DataArray([[1.0, 1.0], [0.0, 1.0]], dims=("out", "in"))
    >>> G = xr.DataArray([[1.0, 1.0], [1.0, 2.0]], dims=("in_i", "in_j"))
    >>> sorted(nfa_alignment(W, G).data_vars)
    ['nfa_corr_diag', 'nfa_corr_full', 'nfa_sqrt_corr_diag', 'nfa_sqrt_corr_full']
    """
    kw = {"out_dim": out_dim, "in_dim": in_dim, "dims": dims}
    return xr.Dataset(
        {
            f"nfa_{'sqrt_' if sqrt else ''}corr_{mode}": nfa_correlation(
                W, agop, mode=mode, sqrt=sqrt, **kw
            )
            for sqrt in (False, True)
            for mode in ("full", "diag")
        }
    )
