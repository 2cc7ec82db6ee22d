"""AGOP and Neural Feature Ansatz correlations against direct formulas."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import scipy.linalg
import xarray as xr
from reducer_helpers import close, is_lazy

# the package re-exports the function `agop`, which shadows the module attribute
G = importlib.import_module("gramlin_analyze.reducers.agop")

STEPS = np.array([0, 7, 9])
N, C, D = 30, 3, 5


def _ref_agop(j):
    out = np.zeros(j.shape[:-3] + (j.shape[-1],) * 2)
    for idx in np.ndindex(j.shape[:-3]):
        out[idx] = sum(j[idx][i].T @ j[idx][i] for i in range(j.shape[-3])) / j.shape[-3]
    return out


def test_agop(make, rng):
    j = rng.standard_normal((len(STEPS), N, C, D))
    J = make(j, ("step", "sample", "output", "in"), step=STEPS)
    out = G.agop(J)
    assert out.dims == ("step", "in_i", "in_j") and is_lazy(out) == is_lazy(J)
    close(out, _ref_agop(j))


def test_projection_estimate_is_unbiased(rng):
    # averaging (J^T v)(J^T v)^T over every Rademacher v in {-1, 1}^C is exactly J^T J
    j = rng.standard_normal((N, C, D))
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=C)))  # (2^C, C)
    proj = np.einsum("ncd,pc->npd", j, signs)
    est = G.agop(xr.DataArray(proj, dims=("sample", "output", "in")), projections=True)
    close(est, _ref_agop(j))


def test_psd_sqrt(rng):
    a = rng.standard_normal((6, 4))
    m = a @ a.T  # rank 4 PSD, two zero eigenvalues
    root = G.psd_sqrt_np(m)
    close(root @ root, m)
    close(root, scipy.linalg.sqrtm(m).real, rtol=1e-6)  # sqrtm is inexact on singular input


def test_nfa_correlations(make, rng):
    w = rng.standard_normal((len(STEPS), 4, D))
    j = rng.standard_normal((len(STEPS), N, C, D))
    agop = _ref_agop(j) + np.einsum("sij,sik->sjk", w, w)  # related to W^T W, not equal
    W = make(w, ("step", "out", "in"), step=STEPS)
    A = make(agop, ("step", "in_i", "in_j"), step=STEPS)
    res = G.nfa_alignment(W, A)
    for k in range(len(STEPS)):
        g = w[k].T @ w[k]
        root = scipy.linalg.sqrtm(agop[k]).real
        close(res.nfa_corr_full[k], np.corrcoef(g.ravel(), agop[k].ravel())[0, 1])
        close(res.nfa_corr_diag[k], np.corrcoef(np.diag(g), np.diag(agop[k]))[0, 1])
        close(res.nfa_sqrt_corr_full[k], np.corrcoef(g.ravel(), root.ravel())[0, 1], rtol=1e-8)
        close(res.nfa_sqrt_corr_diag[k], np.corrcoef(np.diag(g), np.diag(root))[0, 1], rtol=1e-8)
    close(G.nfa_correlation(W, A, sqrt=True, mode="diag"), res.nfa_sqrt_corr_diag.values)


def test_nonfinite_jacobian(rng):
    j = rng.standard_normal((2, N, C, D))
    j[1, 3, 0, 0] = np.nan
    out = G.agop(
        xr.DataArray(j, dims=("step", "sample", "output", "in")).chunk({"sample": 7})
    ).values
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
    w = rng.standard_normal((3, D))
    assert np.isnan(G.nfa_correlation_np(w, out[1], sqrt=True))
