"""Fixtures shared by the reducer tests: NumPy and Dask backends with several chunkings."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

# Each reducer runs on NumPy-backed DataArrays and on Dask-backed ones chunked
# several ways along "sample", "step" and "out" (the store tiles weights by rows).
CHUNKINGS: dict[str, dict[str, int] | None] = {
    "numpy": None,
    "dask-one-chunk": {},
    "dask-fine": {"sample": 7, "step": 1, "out": 3},
    "dask-uneven": {"sample": 23, "step": 2, "out": 5, "in": 4},
}

# `pytest tests/reducers` from a checkout without an editable install (`make test`
# installs one; `python -m pytest` puts the checkout on the path itself).
if importlib.util.find_spec("gramlin_analyze") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

Maker = Callable[..., xr.DataArray]


def _make(chunks: dict[str, int] | None) -> Maker:
    def make(array: np.ndarray, dims: tuple[str, ...], **coords: object) -> xr.DataArray:
        out = xr.DataArray(np.asarray(array), dims=dims, coords=coords)
        if chunks is None:
            return out
        return out.chunk({d: c for d, c in chunks.items() if d in dims} or {d: -1 for d in dims})

    return make


@pytest.fixture(params=list(CHUNKINGS), ids=list(CHUNKINGS))
def make(request: pytest.FixtureRequest) -> Maker:
    """Build a DataArray from a NumPy array, NumPy or Dask backed (parametrized)."""
    return _make(CHUNKINGS[request.param])


# Fresh data every run; a failing run prints its seed, and GRAMLIN_TEST_SEED replays it.
SESSION_SEED = int(os.environ.get("GRAMLIN_TEST_SEED", secrets.randbits(32)))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A seeded generator, different per test and per run (seed printed for replay)."""
    print(f"GRAMLIN_TEST_SEED={SESSION_SEED} (test {request.node.nodeid})")
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(autouse=True, scope="session")
def _sync_scheduler():
    # The synchronous scheduler keeps 2-core CI fast and tracebacks readable.
    with dask.config.set(scheduler="synchronous"):
        yield
