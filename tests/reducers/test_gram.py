"""Gram matrices, spectra, ranks, norms and Gram changes against textbook formulas."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reducer_helpers import close, is_lazy

# the package re-exports the function `gram`, which shadows the module attribute
G = importlib.import_module("gramlin_analyze.reducers.gram")
S = importlib.import_module("gramlin_analyze.reducers.spectrum")

STEPS = np.array([0, 10, 25, 40])


def _weights(rng: np.random.Generator, d_out: int, d_in: int) -> np.ndarray:
    return rng.standard_normal((len(STEPS), d_out, d_in)) * rng.uniform(0.5, 2.0)


def _ref_gram(w: np.ndarray) -> np.ndarray:
    d = w.shape[-1]
    out = np.zeros(w.shape[:-2] + (d, d))
    for idx in np.ndindex(w.shape[:-2]):
        for row in w[idx]:
            out[idx] += np.outer(row, row)
    return out


def _ref_spectrum(w: np.ndarray) -> np.ndarray:
    # singular values squared: independent of the eigh-of-Gram route under test
    return np.linalg.svd(w, compute_uv=False) ** 2


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)], ids=["tall", "wide"])
def test_gram_both_sides(make, rng, shape):
    w = _weights(rng, *shape)
    W = make(w, ("step", "out", "in"), step=STEPS)
    g_in = G.gram(W)
    g_out = G.gram(W, side="out")
    assert g_in.dims == ("step", "in_i", "in_j")
    assert g_out.dims == ("step", "out_i", "out_j")
    assert is_lazy(g_in) == is_lazy(W)
    close(g_in, _ref_gram(w))
    close(g_out, _ref_gram(np.swapaxes(w, -1, -2)))
    np.testing.assert_array_equal(g_in.step, STEPS)
    close(G.gram_np(w), _ref_gram(w))


def test_gram_custom_dims(rng):
    w = rng.standard_normal((5, 4))
    W = xr.DataArray(w, dims=("rows", "cols"))
    g = G.gram(W, out_dim="rows", in_dim="cols", dims=("a", "b"))
    assert g.dims == ("a", "b")
    close(g, w.T @ w)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (5, 5)])
def test_spectrum_and_ranks(make, rng, shape):
    w = _weights(rng, *shape)
    W = make(w, ("step", "out", "in"), step=STEPS)
    ref = _ref_spectrum(w)
    spec = S.gram_spectrum(W)
    assert spec.dims == ("step", "k")
    close(spec, ref)
    p = ref / ref.sum(-1, keepdims=True)
    close(S.effective_rank(W), np.exp(-(p * np.log(p)).sum(-1)))
    fro = np.array([np.linalg.norm(x, "fro") for x in w])
    two = np.array([np.linalg.norm(x, 2) for x in w])
    close(S.frobenius_norm(W), fro)
    close(S.spectral_norm(W), two)
    close(S.stable_rank(W), fro**2 / two**2)


def test_spectrum_padding(rng):
    w = rng.standard_normal((3, 5))
    ref = _ref_spectrum(w)
    W = xr.DataArray(w, dims=("out", "in"))
    close(S.gram_spectrum(W, k=2), ref[:2])
    s = S.gram_spectrum(W, k=7).values
    close(s[:3], ref)
    assert np.all(s[3:5] == 0.0) and np.isnan(s[5:]).all()
    np.testing.assert_array_equal(S.gram_spectrum(W, k=7).k, np.arange(7))


def test_effective_rank_of_rank_deficient(rng):
    # rank 2 in a 6x6 matrix with equal singular values: effective rank exactly 2
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    w = 3.0 * q[:, :2] @ q[:, 2:4].T
    close(S.effective_rank(xr.DataArray(w, dims=("out", "in"))), 2.0, rtol=1e-10)


def test_gram_change(make, rng):
    w = _weights(rng, 7, 5)
    W = make(w, ("step", "out", "in"), step=STEPS)
    ref = _ref_gram(w)
    up = G.gram_change(W)
    close(up, ref[1:] - ref[:-1])
    np.testing.assert_array_equal(up.step, STEPS[1:])
    np.testing.assert_array_equal(up.step_start, STEPS[:-1])
    low = G.gram_change(W, label="lower")
    np.testing.assert_array_equal(low.step, STEPS[:-1])
    np.testing.assert_array_equal(low.step_end, STEPS[1:])
    close(low, ref[1:] - ref[:-1])


def test_gram_change_needs_increasing_steps(rng):
    W = xr.DataArray(
        rng.standard_normal((3, 2, 2)), dims=("step", "out", "in"), coords={"step": [0, 20, 10]}
    )
    with pytest.raises(ValueError, match="strictly increasing"):
        G.gram_change(W)


def test_nonfinite_gives_nan_per_step(make, rng):
    w = _weights(rng, 6, 4)
    w[1, 2, 3] = np.nan
    w[2, 0, 0] = np.inf
    W = make(w, ("step", "out", "in"), step=STEPS)
    good = [0, 3]
    for res in (G.gram(W), S.gram_spectrum(W)):
        vals = res.values
        assert np.isnan(vals[1]).all() and np.isnan(vals[2]).all()
        assert np.isfinite(vals[good]).all()
    for func in (S.effective_rank, S.stable_rank, S.frobenius_norm, S.spectral_norm):
        vals = func(W).values
        assert np.isnan(vals[[1, 2]]).all() and np.isfinite(vals[good]).all()


def test_zero_matrix_ranks_are_nan():
    W = xr.DataArray(np.zeros((3, 2)), dims=("out", "in"))
    assert np.isnan(S.effective_rank(W)) and np.isnan(S.stable_rank(W))
    assert float(S.frobenius_norm(W)) == 0.0


def test_missing_dims_message():
    with pytest.raises(ValueError, match="missing"):
        G.gram(xr.DataArray(np.ones((2, 2)), dims=("a", "b")))


matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
    elements=st.floats(-1e3, 1e3, allow_nan=False, width=64),
)


@settings(max_examples=40, deadline=None)
@given(matrices)
def test_gram_symmetric_psd(w):
    g = G.gram_np(w)
    np.testing.assert_array_equal(g, g.T)
    scale = max(1.0, float(np.abs(g).max()))
    assert np.linalg.eigvalsh(g).min() >= -1e-12 * scale * g.shape[0]
    spec = S.gram_spectrum_np(w)
    assert np.all(spec >= 0) and np.all(np.diff(spec) <= 0)
    er = S.effective_rank_np(spec)
    if spec.sum() > 0:
        assert 1.0 - 1e-12 <= er <= np.count_nonzero(spec) + 1e-9


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_chunking_never_changes_gram(out_chunk, step_chunk, seed):
    w = np.random.default_rng(seed).standard_normal((6, 9, 4))
    W = xr.DataArray(w, dims=("step", "out", "in"))
    lazy = G.gram(W.chunk({"out": out_chunk, "step": step_chunk})).values
    close(lazy, G.gram(W).values, rtol=1e-12)
