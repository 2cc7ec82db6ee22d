"""The paper's TL conventions in ``analyze``: PCA of wide layers (``--tl-pca``), per-image samples.

References re-implement the paper's code (cth127/GramLin ``src/metric.py``:
``compute_layerwise_metrics``, ``target_linearity``, ``surrogate``) independently in
float64 NumPy: one-hot targets centered per column, ``H`` projected onto its top 256
principal axes (of the centered ``H``) when wider than 1000, an uncentered regression
without intercept; the surrogate ``mean(diag(Y^T Z Z^T Y))`` with ``Z = H W^T``,
projected likewise. The paper's ``torch.pca_lowrank`` is randomized: its TL over seeds
brackets the exact one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gramlin_analyze as ga
from gramlin_analyze.errors import UsageError
from tests.paper_reference import regression_r2

N, D, C, D_OUT = 600, 1200, 10, 1100


def paper_pca(X, k=256, above=1000):
    """``X V`` with ``V`` the exact top-``k`` right singular vectors of the centered ``X``."""
    if X.shape[1] <= above:
        return X
    _, _, vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    return X @ vt[:k].T


def paper_tl(H, labels):
    Y = np.eye(C)[labels]
    Y = Y - Y.mean(axis=0)
    return regression_r2(H, Y)


def paper_surrogate(H, W, labels):
    Y = np.eye(C)[labels]
    Y = Y - Y.mean(axis=0)
    Z = paper_pca(H @ W.T)
    return float(np.mean(np.sum((Z.T @ Y) ** 2, axis=0)))


def _wide_data():
    """Features with a decaying spectrum and a class signal spread over many axes."""
    rng = np.random.default_rng(160)
    labels = rng.integers(0, C, N)
    basis = rng.standard_normal((D, D)) / np.sqrt(D)
    scales = 3.0 * np.exp(-np.arange(D) / 120.0) + 0.05
    latent = rng.standard_normal((N, D)) * scales
    latent[:, :40] += 1.5 * rng.standard_normal((C, 40))[labels]
    H = (latent @ basis.T + 0.3).astype(np.float32)
    W = (rng.standard_normal((D_OUT, D)) / np.sqrt(D)).astype(np.float32)
    return H, W, labels


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide")
    H, W, labels = _wide_data()
    run, acts = tmp / "run", tmp / "acts"
    run.mkdir()
    acts.mkdir()
    save_file({"fc.weight": torch.from_numpy(W)}, str(run / "step_0.safetensors"))
    np.savez(tmp / "p.npz", inputs=np.zeros((N, 2), np.float32), labels=labels)
    g = np.random.default_rng(161).standard_normal((N, D)).astype(np.float32)
    np.savez(acts / "step_0.npz", **{"fc/input": H, "fc/input_grad": g})
    assert not ga.ingest(run, tmp / "s.zarr", activations=acts, probe=tmp / "p.npz").failed
    return tmp / "s.zarr", H.astype(np.float64), W.astype(np.float64), labels


def _metrics(store, name):
    return float(ga.open(store)["metrics"][name].sel(step=0, layer="fc"))


def test_tl_pca_256_equals_exact_pca_reference(wide_store):
    store, H, W, labels = wide_store
    ga.analyze(store, metrics=["tl"], tl_pca=256)  # the paper's: 256 above width 1000
    expected = paper_tl(paper_pca(H), labels)
    assert 0.2 < expected < 0.95  # neither trivial nor saturated
    np.testing.assert_allclose(_metrics(store, "target_linearity"), expected, atol=1e-6)
    np.testing.assert_allclose(_metrics(store, "tl_null"), 256 / N)
    surrogate = paper_surrogate(H, W, labels)
    np.testing.assert_allclose(_metrics(store, "tl_surrogate"), surrogate, rtol=1e-6)
    attrs = ga.open(store)["metrics"]["target_linearity"].attrs
    assert attrs["tl_pca"] == 256 and attrs["tl_pca_above"] == 1000
    assert attrs["tl_samples_by_layer"]["fc"]["tl_pca_components"] == 256
    assert attrs["tl_samples_by_layer"]["fc"]["surrogate_pca_components"] == 256


@pytest.mark.slow
def test_tl_pca_within_pca_lowrank_spread_and_disabled(wide_store):
    store, H, _, labels = wide_store
    expected = paper_tl(paper_pca(H), labels)
    # the paper's randomized torch.pca_lowrank: exact PCA lies within its spread over seeds
    Ht = torch.from_numpy(H).float()  # as the paper's features
    lowrank = []
    for seed in range(3):
        torch.manual_seed(seed)
        _, _, V = torch.pca_lowrank(Ht, q=256)
        lowrank.append(paper_tl((Ht @ V).double().numpy(), labels))
    spread = max(lowrank) - min(lowrank)
    assert abs(expected - np.mean(lowrank)) <= max(2 * spread, 2e-3), (expected, lowrank)

    # --tl-pca 0: no projection, the full regression (recomputed: the options changed)
    ga.analyze(store, metrics=["tl"], tl_pca=0)
    full = paper_tl(H, labels)
    np.testing.assert_allclose(_metrics(store, "target_linearity"), full, atol=1e-6)
    attrs = ga.open(store)["metrics"]["target_linearity"].attrs
    assert attrs["tl_pca"] == 0 and attrs["tl_samples_by_layer"]["fc"]["tl_pca_components"] == 0


def test_tl_options_refused(wide_store):
    store = wide_store[0]
    with pytest.raises(UsageError, match="--conv-samples"):
        ga.analyze(store, metrics=["tl"], conv_samples="pixel")
    with pytest.raises(UsageError, match="--tl-pca"):
        ga.analyze(store, metrics=["tl"], tl_pca=-1)
