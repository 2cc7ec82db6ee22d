import os

import numpy as np
import pytest

# Keras reads its backend at import time; the test suite uses the installed torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(params=["internals", "public"])
def zarr_paths(request, monkeypatch):
    """Run a test on both of the store's paths through zarr: its shortcuts through
    zarr's internals (where the installed zarr has them) and zarr's public API alone."""
    if request.param == "public":
        monkeypatch.setenv("GRAMLIN_ZARR_PUBLIC", "1")
    else:
        monkeypatch.delenv("GRAMLIN_ZARR_PUBLIC", raising=False)
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh data per test, the same on every run."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
