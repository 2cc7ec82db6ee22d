"""Assertions shared by the reducer tests (a plain module: conftest is not importable)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr


def close(actual: object, expected: object, rtol: float = 1e-10) -> None:
    """Equal to ``rtol`` relative to the largest magnitude of ``expected``."""
    a = np.asarray(actual.values if isinstance(actual, xr.DataArray) else actual, dtype=float)
    b = np.asarray(expected, dtype=float)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.nanmax(np.abs(b)) if b.size and np.isfinite(b).any() else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def is_lazy(x: xr.DataArray) -> bool:
    return isinstance(x.data, da.Array)
