import pytest

from tests.plot.stores import cached_store


@pytest.fixture(scope="session")
def mlp_store(tmp_path_factory):
    """The capture MLP of tests/capture_models.py, trained 9 steps, ingested and analyzed (AGOP too)."""
    return cached_store(tmp_path_factory, "mlp")


@pytest.fixture(scope="session")
def bert_store(tmp_path_factory):
    """The tiny BERT of tests/plot/models.py: 17 layers, per-token rows, embeddings without activations."""
    return cached_store(tmp_path_factory, "bert")
