"""The .gramlin accessor on a store-shaped layer group gives the functions' results."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from reducer_helpers import close

import gramlin_analyze.reducers as R
from gramlin_analyze.errors import MissingDataError

STEPS = np.array([0, 100, 200, 400])
N, D_IN, D_OUT, C = 48, 6, 4, 4


@pytest.fixture
def layer(make, rng):
    """A /layers/<name> group as the store lays it out, plus probe labels and lr."""
    ds = xr.Dataset(
        {
            "weight": make(
                rng.standard_normal((4, D_OUT, D_IN)), ("step", "out", "in"), step=STEPS
            ),
            "bias": make(rng.standard_normal((4, D_OUT)), ("step", "out"), step=STEPS),
            "input": make(rng.standard_normal((4, N, D_IN)), ("step", "sample", "in"), step=STEPS),
            "input_grad": make(
                0.01 * rng.standard_normal((4, N, D_IN)), ("step", "sample", "in"), step=STEPS
            ),
            "labels": make(np.concatenate([np.arange(C), rng.integers(0, C, N - C)]), ("sample",)),
            "lr": make(np.array([0.1, 0.1, 0.05, 0.05]), ("step",), step=STEPS),
        }
    )
    return ds


def test_dataset_accessor_matches_functions(layer):
    W, h, g, lr = layer.weight, layer.input, layer.input_grad, layer.lr
    acc = layer.gramlin
    close(acc.gram(), R.gram(W).values)
    close(acc.spectrum(), R.gram_spectrum(W).values)
    close(acc.effective_rank(), R.effective_rank(W).values)
    close(acc.stable_rank(), R.stable_rank(W).values)
    close(acc.gram_change(), R.gram_change(W).values)
    close(acc.virtual_covariance("lr"), R.virtual_covariance(h, g, lr).values)
    vcs = R.virtual_covariance_shift(h, g, lr)
    close(acc.virtual_covariance_shift(lr), vcs.values)
    close(acc.accumulated_vcs("lr"), R.accumulated_vcs(vcs).values)
    close(acc.gram_vc_corr("lr"), R.pearson(R.gram(W), R.accumulated_vcs(vcs)).values)
    close(
        acc.gram_vc_corr("lr", against="vc", mode="full"),
        R.pearson(R.gram(W), R.virtual_covariance(h, g, lr), mode="full").values,
    )
    ref = R.vcs_interval_consistency(R.gram(W), vcs)
    res = acc.vcs_interval_consistency("lr")
    close(res.vcs_interval_corr, ref.vcs_interval_corr.values)
    close(res.vcs_interval_ratio, ref.vcs_interval_ratio.values)
    close(acc.fle_residual("lr"), R.fle_residual(R.gram_change(W, label="lower"), vcs).values)
    close(acc.target_linearity(labels="labels"), R.target_linearity(h, labels=layer.labels).values)
    assert float(acc.tl_null()) == D_IN / N
    sur = acc.tl_surrogate(labels="labels")
    close(sur.tl_surrogate, R.tl_surrogate(h, W, labels=layer.labels).tl_surrogate.values)


def test_readout_collapse_and_nfa(rng):
    labels = np.concatenate([np.arange(C), rng.integers(0, C, N - C)])
    ds = xr.Dataset(
        {
            "weight": (("out", "in"), rng.standard_normal((C, D_IN))),
            "bias": (("out",), rng.standard_normal(C)),
            "input": (("sample", "in"), rng.standard_normal((N, D_IN))),
            "labels": (("sample",), labels),
        }
    )
    res = ds.gramlin.neural_collapse("labels")
    ref = R.neural_collapse(ds.input, ds.labels, W=ds.weight, b=ds.bias)
    for name in ref.data_vars:
        close(res[name], ref[name].values)
    assert "nc3" not in ds.gramlin.neural_collapse("labels", readout=False)
    agop = xr.DataArray(np.cov(rng.standard_normal((D_IN, 30))), dims=("in_i", "in_j"))
    nfa = ds.gramlin.nfa_alignment(agop)
    close(nfa.nfa_corr_full, R.nfa_correlation(ds.weight, agop).values)


def test_dataarray_accessor(rng):
    W = xr.DataArray(rng.standard_normal((5, 3)), dims=("out", "in"))
    close(W.gramlin.gram(), W.values.T @ W.values)
    close(W.gramlin.frobenius_norm(), np.linalg.norm(W.values))
    close(W.gramlin.spectral_norm(), np.linalg.norm(W.values, 2))
    h = xr.DataArray(rng.standard_normal((20, 3)), dims=("sample", "in"))
    close(h.gramlin.linear_cka(h * 2.0), 1.0)
    labels = xr.DataArray(np.arange(20) % 2, dims="sample")
    close(h.gramlin.target_linearity(labels=labels), R.target_linearity(h, labels=labels).values)
    G = W.gramlin.gram()
    close(G.gramlin.pearson(G, mode="full"), 1.0)
    close(G.gramlin.cosine_similarity(G), 1.0)


def test_missing_variable_is_actionable(rng):
    ds = xr.Dataset({"weight": (("out", "in"), rng.standard_normal((2, 2)))})
    with pytest.raises(MissingDataError, match="'input'"):
        ds.gramlin.target_linearity(labels=xr.DataArray([0, 1], dims="sample"))
    with pytest.raises(LookupError):
        ds.gramlin.virtual_covariance(0.1)


def test_nonfinite_helper():
    assert R.nonfinite(np.array([1.0, np.inf]))
    assert not R.nonfinite(np.arange(3))
    np.testing.assert_array_equal(
        R.nonfinite(np.array([[1.0, np.nan], [1.0, 2.0]]), axis=1), [True, False]
    )
