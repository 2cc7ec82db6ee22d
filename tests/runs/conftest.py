import pytest

from tests.plot.stores import cached_store
from tests.runs.stores import cached_sweep


@pytest.fixture(scope="session")
def mlp_store(tmp_path_factory):
    """The capture MLP of tests/capture_models.py, trained 9 steps, ingested and analyzed (AGOP too)."""
    return cached_store(tmp_path_factory, "mlp")


@pytest.fixture(scope="session")
def noise_sweep(tmp_path_factory):
    """Four runs derived from the MLP store: label noise 0 and 0.5, two seeds each."""
    return cached_sweep(tmp_path_factory)
