import os

import numpy as np
import pytest

# Keras reads its backend at import time; the test suite uses the installed torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh data per test, the same on every run."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback with one bucket, for the whole session."""
    from tests.s3_server import moto_s3

    with moto_s3() as server:
        yield server
