"""Shared machinery of the reducers: non-finite handling, streamed sums, apply_ufunc.

Every reducer is a float64 NumPy kernel whose reduced axes come last, plus a
thin xarray wrapper. Quantities that sum over samples (or over the rows of a
weight) are computed from *sufficient statistics*: a kernel maps one block of
samples to a flat float64 vector of partial sums, the partial sums of all
blocks are added (a Dask tree reduction when the samples are chunked), and a
second kernel turns the summed statistics into the measurement. Only
additive statistics are used, so blocks can be summed in any order.

Non-finite inputs never crash a reducer and are never skipped: a NaN or Inf
anywhere in the data a result depends on makes that result NaN (for a batch
entry such as one step, the whole matrix or scalar of that entry).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt


class _OnFirstUse:
    """A module imported at its first attribute lookup: the NumPy kernels
    (what ``analyze`` runs) then import neither xarray nor Dask."""

    def __init__(self, name: str):
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


if TYPE_CHECKING:
    import dask.array as dask_array
    import xarray as xr
else:
    xr = _OnFirstUse("xarray")
    dask_array = _OnFirstUse("dask.array")

__all__ = ["nonfinite", "one_hot_np"]

FloatArray = npt.NDArray[np.float64]
F = TypeVar("F", bound=Callable[..., Any])
STAT_DIM = "_gramlin_stat"
EPS = float(np.finfo(np.float64).eps)


def nonfinite(x: npt.ArrayLike, *, axis: int | tuple[int, ...] | None = None) -> Any:
    """Whether any value is NaN or infinite.

    Parameters
    ----------
    x : array_like
        Values to check (any numeric dtype; integers are always finite).
    axis : int or tuple of int, optional
        Axes to reduce over; by default all of them (a single bool).

    Returns
    -------
    bool or numpy.ndarray of bool
        True where at least one value along ``axis`` is NaN or +-Inf.

    Examples
    --------
    >>> import numpy as np
    >>> nonfinite(np.array([[1.0, np.nan], [2.0, 3.0]]), axis=-1)
    array([ True, False])
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.inexact):
        return np.zeros(arr.shape, dtype=bool).any(axis=axis)
    return np.logical_not(np.isfinite(arr)).any(axis=axis)


def quiet(func: F) -> F:
    """Silence floating-point warnings: NaN/Inf results are intended and documented."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(all="ignore"):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def batch_bad(x: np.ndarray, core_ndim: int) -> np.ndarray:
    """Boolean over the leading (batch) axes: True where the core block has a NaN/Inf."""
    return np.asarray(nonfinite(x, axis=tuple(range(np.ndim(x) - core_ndim, np.ndim(x)))))


def poison(out: FloatArray, bad: np.ndarray, core_ndim: int) -> FloatArray:
    """Set the core blocks of ``out`` whose batch entry is ``bad`` to NaN (in place)."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return out
    batch = out.shape[: out.ndim - core_ndim]
    mask = np.broadcast_to(bad, batch)
    out[mask] = np.nan
    return out


def mask_nonfinite(out: Any, out_core: int, *inputs: tuple[Any, int]) -> FloatArray:
    """``out`` with NaN wherever an input's batch entry holds a NaN/Inf.

    ``inputs`` are ``(array, core_ndim)`` pairs whose batch axes broadcast
    against those of ``out`` (which has ``out_core`` core axes).
    """
    out = as_float64(out)
    bad = np.zeros((), dtype=bool)
    for x, core in inputs:
        bad = bad | batch_bad(as_float64(x), core)
    bad = np.broadcast_to(bad, out.shape[: out.ndim - out_core])
    return np.where(bad[(...,) + (None,) * out_core], np.nan, out)


def sanitize(x: FloatArray, core_ndim: int, fill: float = 0.0) -> tuple[FloatArray, np.ndarray]:
    """Replace batch entries holding NaN/Inf by ``fill`` so LAPACK never sees them.

    Returns the cleaned copy (or ``x`` itself when all is finite) and the bad mask;
    callers poison their outputs with the mask afterwards.
    """
    bad = batch_bad(x, core_ndim)
    if not np.any(bad):
        return x, bad
    clean = np.array(x, dtype=np.float64, copy=True)
    clean[np.broadcast_to(bad, clean.shape[: clean.ndim - core_ndim])] = fill
    return clean, bad


def as_float64(x: npt.ArrayLike) -> FloatArray:
    """``x`` as a float64 ndarray (no copy when it already is one)."""
    return np.asarray(x, dtype=np.float64)


def sym(a: FloatArray) -> FloatArray:
    """Symmetric part over the last two axes (removes round-off asymmetry)."""
    return 0.5 * (a + np.swapaxes(a, -1, -2))


def eigh_desc(a: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Batched ``eigh`` of symmetric matrices, eigenvalues descending; NaN for non-finite input."""
    clean, bad = sanitize(as_float64(a), 2)
    w, v = np.linalg.eigh(sym(clean))
    w = np.ascontiguousarray(w[..., ::-1])
    v = np.ascontiguousarray(v[..., ::-1])
    return poison(w, bad, 1), poison(v, bad, 2)


def default_rtol(n: int) -> float:
    """Relative eigenvalue cutoff of pseudo-inverses of ``n x n`` PSD matrices.

    ``eigh`` resolves eigenvalues only to about ``n * eps * max|lambda|``;
    anything below that is indistinguishable from an exact zero, so it is
    dropped (a pseudo-inverse, never a jitter). The factor 10 is headroom
    for the round-off of forming the matrix from streamed sums.
    """
    return 10.0 * max(n, 1) * EPS


# ----------------------------------------------------------------------------
# xarray / Dask plumbing
# ----------------------------------------------------------------------------


def is_dask(x: Any) -> bool:
    da = sys.modules.get("dask.array")  # a Dask array exists only once dask.array is imported
    if da is None:
        return False
    data = x.data if isinstance(x, xr.DataArray) else x
    return isinstance(data, da.Array)


def require_dims(da: xr.DataArray, dims: Sequence[Hashable], what: str) -> None:
    """Raise a ValueError naming the missing dims of ``da``."""
    missing = [d for d in dims if d not in da.dims]
    if missing:
        raise ValueError(
            f"{what} needs dims {list(dims)} but has {list(da.dims)} (missing {missing}); "
            "pass the dim names as keyword arguments if yours differ"
        )


def stream_sum(
    kernel: Callable[..., FloatArray],
    arrays: Sequence[xr.DataArray],
    *,
    reduce_dim: Hashable,
    core_dims: Sequence[Sequence[Hashable]],
    size: int,
    constants: Sequence[xr.DataArray] = (),
    constant_core_dims: Sequence[Sequence[Hashable]] = (),
    split_every: int | None = None,
) -> xr.DataArray:
    """Sum ``kernel`` over blocks of ``reduce_dim``: a mergeable sufficient statistic.

    ``kernel(*blocks, *constants)`` receives each array with axes
    ``(*leading, reduce_dim, *core)`` (leading axes broadcastable, size 1
    where an array lacks a leading dim) and each constant with axes
    ``(*leading, *core)``; it returns the partial statistics of that block,
    shape ``(*leading, size)``. NumPy-backed inputs are passed whole; with a
    Dask-backed input each block of ``reduce_dim`` gets its own task and the
    partial sums are added by a tree reduction, so no task holds more than
    one block of samples.

    Returns a DataArray of dims ``(*leading, STAT_DIM)``.
    """
    _check_stream_inputs(arrays, constants, core_dims, constant_core_dims, reduce_dim)
    every = list(arrays) + list(constants)
    every_core = [list(c) for c in core_dims] + [list(c) for c in constant_core_dims]
    aligned = xr.align(*every, join="exact", exclude={d for core in every_core for d in core})
    leading = _leading_dims(aligned, every_core, reduce_dim)
    datas = [
        _kernel_axes(arr, leading, [reduce_dim] * (j < len(arrays)) + core)
        for j, (arr, core) in enumerate(zip(aligned, every_core, strict=True))
    ]
    if any(is_dask(d) for d in datas):
        stats = _dask_stream_sum(
            kernel, datas, every_core, len(arrays), len(leading), size, split_every
        )
    else:
        stats = kernel(*[np.asarray(d) for d in datas])
    return xr.DataArray(stats, dims=[*leading, STAT_DIM], coords=_leading_coords(aligned, leading))


def _check_stream_inputs(
    arrays: Sequence[xr.DataArray],
    constants: Sequence[xr.DataArray],
    core_dims: Sequence[Sequence[Hashable]],
    constant_core_dims: Sequence[Sequence[Hashable]],
    reduce_dim: Hashable,
) -> None:
    """Every input has its dims, and the streamed arrays describe the same samples."""
    for arr, core in zip(arrays, core_dims, strict=True):
        require_dims(arr, [reduce_dim, *core], "input")
    for arr, core in zip(constants, constant_core_dims, strict=True):
        require_dims(arr, core, "input")
    n_by_input = {arr.name or f"input {j}": arr.sizes[reduce_dim] for j, arr in enumerate(arrays)}
    if len(set(n_by_input.values())) > 1:
        raise ValueError(
            f"inputs disagree on the number of {reduce_dim!r} entries: {n_by_input}; they must "
            "describe the same samples (a conv layer's input has one sample per example and "
            "position: repeat per-example labels with numpy.repeat(labels, samples_per_example))"
        )


def _leading_dims(
    aligned: Sequence[xr.DataArray], every_core: Sequence[Sequence[Hashable]], reduce_dim: Hashable
) -> list[Hashable]:
    """The dims of the inputs that are neither reduced nor core, in order of appearance;
    each must have one size across the inputs."""
    leading: list[Hashable] = []
    for arr, core in zip(aligned, every_core, strict=True):
        for d in arr.dims:
            if d != reduce_dim and d not in core and d not in leading:
                leading.append(d)
    sizes: dict[Hashable, int] = {}
    for arr in aligned:
        for d in arr.dims:
            if d in leading:
                if sizes.setdefault(d, arr.sizes[d]) != arr.sizes[d]:
                    raise ValueError(f"dim {d!r} has sizes {sizes[d]} and {arr.sizes[d]}")
    return leading


def _kernel_axes(arr: xr.DataArray, leading: Sequence[Hashable], tail: Sequence[Hashable]) -> Any:
    """The data of ``arr`` with axes ``(*leading, *tail)``: size 1 where it lacks a leading dim."""
    own = [d for d in leading if d in arr.dims]
    data = arr.transpose(*own, *tail).data
    index = tuple(slice(None) if d in arr.dims else None for d in leading)
    return data[index + (Ellipsis,)] if len(own) != len(leading) else data


def _leading_coords(aligned: Sequence[xr.DataArray], leading: Sequence[Hashable]) -> dict:
    """The coordinates of the inputs that lie on leading dims only (the first of each name)."""
    coords = {}
    for arr in aligned:
        for name, coord in arr.coords.items():
            if name not in coords and set(coord.dims) <= set(leading):
                coords[name] = coord.variable
    return coords


def _dask_stream_sum(
    kernel: Callable[..., FloatArray],
    datas: Sequence[Any],
    every_core: Sequence[Sequence[Hashable]],
    n_arrays: int,
    n_lead: int,
    size: int,
    split_every: int | None,
) -> Any:
    """One task per block of the reduced axis (core axes whole), partial sums added by a
    tree reduction: no task holds more than one block of samples."""
    # every letter but "r" (the reduced axis) and "Z" (the statistics axis)
    letters = iter("abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY")
    lead_idx = "".join(next(letters) for _ in range(n_lead))
    blockwise_args: list[Any] = []
    for j, (data, core) in enumerate(zip(datas, every_core, strict=True)):
        reduced = j < n_arrays
        data = dask_array.asarray(data)
        data = data.rechunk({ax: -1 for ax in range(n_lead + reduced, data.ndim)})
        idx = lead_idx + ("r" if reduced else "") + "".join(next(letters) for _ in core)
        blockwise_args += [data, idx]

    def block_kernel(*blocks: np.ndarray) -> FloatArray:
        return np.asarray(kernel(*blocks), dtype=np.float64)[..., None, :]

    partial = dask_array.blockwise(
        block_kernel,
        lead_idx + "rZ",
        *blockwise_args,
        new_axes={"Z": size},
        adjust_chunks={"r": 1},
        dtype=np.float64,
        concatenate=True,
        meta=np.empty((0,) * (n_lead + 2), dtype=np.float64),
    )
    return partial.sum(axis=n_lead, split_every=split_every)


def from_stats(data: Any, stats: xr.DataArray, core_dims: Sequence[Hashable]) -> xr.DataArray:
    """Wrap ``data`` (the statistics' leading axes + ``core_dims``) with ``stats``' leading dims and coords."""
    lead = [d for d in stats.dims if d != STAT_DIM]
    coords = {k: v for k, v in stats.coords.items() if STAT_DIM not in v.dims}
    return xr.DataArray(data, dims=[*lead, *core_dims], coords=coords)


def apply(
    func: Callable[..., Any],
    *args: Any,
    input_core_dims: Sequence[Sequence[Hashable]],
    output_core_dims: Sequence[Sequence[Hashable]] = ((),),
    output_sizes: dict[Hashable, int] | None = None,
    kwargs: dict[str, Any] | None = None,
    join: str = "exact",
) -> Any:
    """``xr.apply_ufunc`` with the reducers' defaults (float64, Dask parallelized).

    Core dims that are chunked are merged into one chunk (``allow_rechunk``):
    a kernel sees whole matrices, blocked only along leading dims.
    """
    n_out = len(output_core_dims)
    return xr.apply_ufunc(
        func,
        *args,
        input_core_dims=[list(c) for c in input_core_dims],
        output_core_dims=[list(c) for c in output_core_dims],
        kwargs=kwargs or {},
        dask="parallelized",
        output_dtypes=[np.float64] * n_out,
        dask_gufunc_kwargs={"output_sizes": output_sizes or {}, "allow_rechunk": True},
        keep_attrs=False,
        join=join,
    )


def unpack(
    stats: FloatArray, layout: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, FloatArray]:
    """Split a flat statistics vector (last axis) into named arrays of the given core shapes."""
    out: dict[str, FloatArray] = {}
    start = 0
    lead = stats.shape[:-1]
    for name, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = stats[..., start : start + n].reshape(*lead, *shape)
        start += n
    if start != stats.shape[-1]:
        raise ValueError(f"statistics vector has length {stats.shape[-1]}, layout needs {start}")
    return out


def layout_size(layout: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    return int(sum(np.prod(shape, dtype=np.int64) for _, shape in layout))


def pack(
    parts: dict[str, np.ndarray],
    layout: Sequence[tuple[str, tuple[int, ...]]],
    lead: tuple[int, ...],
) -> FloatArray:
    """Inverse of :func:`unpack`: broadcast each part to ``lead + shape`` and concatenate."""
    flat = [
        np.broadcast_to(np.asarray(parts[name], dtype=np.float64), lead + shape).reshape(*lead, -1)
        for name, shape in layout
    ]
    return np.concatenate(flat, axis=-1)


def gamma_array(gamma: Any) -> Any:
    """A learning rate given as a number or a DataArray (e.g. ``/steps`` ``lr``)."""
    if isinstance(gamma, xr.DataArray):
        return gamma.astype(np.float64)
    return float(gamma)


@quiet
def one_hot_np(labels: npt.ArrayLike, n_classes: int) -> FloatArray:
    """One-hot rows for integer class labels; a row of NaN for an invalid label.

    Labels must be integers in ``[0, n_classes)``; anything else (negative,
    too large, fractional, NaN) gives NaN so that results depending on it are
    NaN rather than silently wrong.

    Examples
    --------
    >>> one_hot_np([0, 2, 5], 3)
    array([[ 1.,  0.,  0.],
           [ 0.,  0.,  1.],
           [nan, nan, nan]])
    """
    lab = np.asarray(labels)
    if np.issubdtype(lab.dtype, np.integer):
        valid = (lab >= 0) & (lab < n_classes)
        idx = np.where(valid, lab, 0).astype(np.intp)
    else:
        labf = lab.astype(np.float64)
        valid = np.isfinite(labf) & (labf >= 0) & (labf < n_classes) & (labf == np.round(labf))
        idx = np.where(valid, labf, 0).astype(np.intp)
    out = (idx[..., None] == np.arange(n_classes)).astype(np.float64)
    out[~valid] = np.nan
    return out


def resolve_targets(
    labels: xr.DataArray | None,
    targets: xr.DataArray | None,
    n_classes: int | None,
    sample_dim: Hashable,
    target_dim: Hashable,
) -> tuple[xr.DataArray, list[Hashable], int, bool]:
    """Labels or targets of a supervised reducer, checked.

    Returns ``(array, its core dims, number of target columns, is_labels)``;
    ``n_classes`` defaults to ``max(labels) + 1`` (computed when Dask backed:
    labels are small).
    """
    if (labels is None) == (targets is None):
        raise ValueError("pass exactly one of labels= (class indices) or targets= (real values)")
    if labels is not None:
        require_dims(labels, [sample_dim], "labels")
        if n_classes is None:
            top = labels.max()
            n_classes = int((top.compute() if is_dask(top) else top).item()) + 1
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        return labels, [], int(n_classes), True
    assert targets is not None
    require_dims(targets, [sample_dim], "targets")
    if target_dim not in targets.dims:
        targets = targets.expand_dims(target_dim, axis=-1)
    return targets, [target_dim], targets.sizes[target_dim], False
