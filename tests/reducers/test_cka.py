"""Linear CKA against the HSIC form on explicit N x N kernels."""

from __future__ import annotations

import numpy as np
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from reducer_helpers import close, is_lazy

from gramlin_analyze.reducers import cka as K

STEPS = np.array([0, 4, 8])
N = 40


def ref_cka(x, y):
    n = len(x)
    center = np.eye(n) - np.ones((n, n)) / n
    kx, ky = center @ x @ x.T @ center, center @ y @ y.T @ center
    return np.sum(kx * ky) / (np.linalg.norm(kx) * np.linalg.norm(ky))


def test_linear_cka_two_layers(make, rng):
    x = rng.standard_normal((len(STEPS), N, 6)) + 2.0
    y = np.tanh(x @ rng.standard_normal((6, 9))) + 0.3 * rng.standard_normal((len(STEPS), N, 9))
    X = make(x, ("step", "sample", "in"), step=STEPS)
    Y = make(y, ("step", "sample", "in"), step=STEPS)
    out = K.linear_cka(X, Y)
    assert out.dims == ("step",) and is_lazy(out) == is_lazy(X)
    close(out, [ref_cka(x[k], y[k]) for k in range(len(STEPS))])


def test_cka_between_steps(make, rng):
    h = rng.standard_normal((len(STEPS), N, 5))
    H = make(h, ("step", "sample", "in"), step=STEPS)
    out = K.linear_cka(H, H.rename(step="step_j"))
    assert out.dims == ("step", "step_j")
    ref = [[ref_cka(h[a], h[b]) for b in range(len(STEPS))] for a in range(len(STEPS))]
    close(out, ref)
    close(np.diag(out.values), np.ones(len(STEPS)))


def test_custom_dims_and_nan(rng):
    x = rng.standard_normal((N, 3))
    y = rng.standard_normal((N, 4))
    X = xr.DataArray(x, dims=("obs", "f"))
    Y = xr.DataArray(y, dims=("obs", "g"))
    close(K.linear_cka(X, Y, sample_dim="obs", x_dim="f", y_dim="g"), ref_cka(x, y))
    y[0, 0] = np.nan
    assert np.isnan(K.linear_cka_np(x, y))


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 30), st.integers(1, 6), st.integers(0, 2**32 - 1), st.floats(-10, 10))
def test_cka_invariant_to_rotation_scale_shift(n, d, seed, shift):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, d))
    q, _ = np.linalg.qr(r.standard_normal((d, d)))
    assert abs(K.linear_cka_np(x, x @ q) - 1.0) < 1e-9
    close(K.linear_cka_np(x, 3.0 * x @ q + shift), 1.0, rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_chunking_never_changes_cka(sample_chunk, seed):
    r = np.random.default_rng(seed)
    X = xr.DataArray(r.standard_normal((2, 40, 3)), dims=("step", "sample", "in"))
    Y = xr.DataArray(r.standard_normal((2, 40, 5)), dims=("step", "sample", "in"))
    ref = K.linear_cka(X, Y).values
    close(
        K.linear_cka(X.chunk(sample=sample_chunk), Y.chunk(sample=max(1, sample_chunk // 2))),
        ref,
        rtol=1e-12,
    )
