"""Virtual covariance, VCS, the FLE terms and accumulation against explicit sums."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from reducer_helpers import close, is_lazy

from gramlin_analyze.reducers import fle as F
from gramlin_analyze.reducers import vc as V
from gramlin_analyze.reducers.gram import gram_change

STEPS = np.array([0, 5, 20])
N, D = 50, 6


def _outer_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_i a_i b_i^T over the sample axis (-2), one outer product at a time."""
    out = np.zeros(a.shape[:-2] + (a.shape[-1], b.shape[-1]))
    for idx in np.ndindex(a.shape[:-2]):
        for i in range(a.shape[-2]):
            out[idx] += np.outer(a[idx][i], b[idx][i])
    return out


def _data(rng):
    h = rng.standard_normal((len(STEPS), N, D)) + 0.5
    g = rng.standard_normal((len(STEPS), N, D)) * 0.1
    gamma = np.array([0.1, 0.05, 0.02])
    return h, g, gamma


def test_stats_vc_vcs(make, rng):
    h, g, gamma = _data(rng)
    H = make(h, ("step", "sample", "in"), step=STEPS)
    Gr = make(g, ("step", "sample", "in"), step=STEPS)
    lr = xr.DataArray(gamma, dims="step", coords={"step": STEPS})
    s = V.vc_stats(H, Gr)
    close(s.sum_hh, _outer_sum(h, h))
    close(s.sum_gh, _outer_sum(g, h))
    close(s.sum_gg, _outer_sum(g, g))
    hp = h - gamma[:, None, None] * g
    vc = V.virtual_covariance(H, Gr, lr)
    assert vc.dims == ("step", "in_i", "in_j") and is_lazy(vc) == is_lazy(H)
    close(vc, _outer_sum(hp, hp))
    close(V.virtual_covariance_shift(H, Gr, gamma=lr), _outer_sum(hp, hp) - _outer_sum(h, h))
    # a scalar learning rate broadcasts too
    hp1 = h - 0.3 * g
    close(V.virtual_covariance(H, Gr, 0.3), _outer_sum(hp1, hp1))


def test_minibatch_second_order_scale(make, rng):
    h, g, _ = _data(rng)
    H = make(h, ("step", "sample", "in"), step=STEPS)
    Gr = make(g, ("step", "sample", "in"), step=STEPS)
    gamma, b = 0.2, 10
    ref = -gamma * (_outer_sum(g, h) + _outer_sum(h, g)) + gamma**2 * (N / b) * _outer_sum(g, g)
    out = V.virtual_covariance_shift(H, Gr, gamma, batch_size=b)
    close(out, ref)
    assert out.attrs["second_order_scale"] == N / b
    ref2 = -gamma * (_outer_sum(g, h) + _outer_sum(h, g)) + gamma**2 * (1000 / b) * _outer_sum(g, g)
    close(V.virtual_covariance_shift(H, Gr, gamma, batch_size=b, n_samples=1000), ref2)
    with pytest.raises(ValueError):
        V.virtual_covariance_shift(H, Gr, gamma, batch_size=0)


def test_accumulated_and_interval_vcs(make, rng):
    steps = np.array([0, 3, 10, 11, 30])
    v = rng.standard_normal((len(steps), 4, 4))
    vcs = make(v, ("step", "in_i", "in_j"), step=steps)
    acc = V.accumulated_vcs(vcs)
    ref = np.zeros_like(v)
    for k in range(1, len(steps)):
        ref[k] = ref[k - 1] + (steps[k] - steps[k - 1]) * (v[k - 1] + v[k]) / 2
    close(acc, ref)
    assert acc.dims == vcs.dims and "estimate" in acc.attrs
    iv = V.interval_vcs(vcs)
    close(iv, ref[1:] - ref[:-1])
    np.testing.assert_array_equal(iv.step, steps[1:])
    np.testing.assert_array_equal(iv.step_start, steps[:-1])
    # step not the first dim
    close(V.accumulated_vcs(vcs.transpose("in_i", "step", "in_j")), ref.transpose(1, 0, 2))


def test_accumulated_vcs_nan_propagates():
    v = xr.DataArray([1.0, np.nan, 2.0, 3.0], dims="step", coords={"step": [0, 1, 2, 3]})
    acc = V.accumulated_vcs(v).values
    assert acc[0] == 0.0 and np.isnan(acc[1:]).all()


def _linear_gd_setup(rng, n=40, d_in=5, d_out=3):
    """One full-batch GD step of a linear layer with mean squared error."""
    W = rng.standard_normal((d_out, d_in))
    h = rng.standard_normal((n, d_in))
    y = rng.standard_normal((n, d_out))
    dz = 2.0 * (h @ W.T - y) / n  # dL/dz_i for L = mean_i ||W h_i - y_i||^2
    g = dz @ W  # g_i = W^T dz_i
    return W, h, dz, g


def test_fle_identity_and_second_order(rng):
    W, h, dz, g = _linear_gd_setup(rng)
    gamma = 0.07
    Gref = sum(np.outer(dz[i], h[i]) for i in range(len(h)))
    # Feature Learning Equation: sum_i g_i h_i^T = W^T G
    close(_outer_sum(g, h), W.T @ Gref)
    Wp = W - gamma * Gref
    dgram_ref = Wp.T @ Wp - W.T @ W

    steps = [0, 1]
    Wx = xr.DataArray(np.stack([W, Wp]), dims=("step", "out", "in"), coords={"step": steps})
    hx = xr.DataArray(h, dims=("sample", "in"))
    gx = xr.DataArray(g, dims=("sample", "in"))
    dzx = xr.DataArray(dz, dims=("sample", "out"))
    Gx = F.weight_gradient(dzx, hx)
    close(Gx, Gref)
    vcs = V.virtual_covariance_shift(hx, gx, gamma)
    second = F.second_order_term(Gx, V.vc_stats(hx, gx).sum_gg, gamma)
    close(second, gamma**2 * (Gref.T @ Gref - _outer_sum(g, g)))
    dgram = gram_change(Wx, label="lower").isel(step=0)
    close(dgram, dgram_ref)
    close(vcs + second, dgram_ref)
    resid = F.fle_residual(dgram, vcs)
    close(resid, np.linalg.norm(dgram_ref - vcs.values) / np.linalg.norm(dgram_ref))
    assert float(F.fle_residual(dgram, vcs + second)) < 1e-10


def test_fle_residual_pairs_by_step(rng):
    a = rng.standard_normal((3, 4, 4))
    b = rng.standard_normal((4, 4, 4))
    dgram = xr.DataArray(a, dims=("step", "in_i", "in_j"), coords={"step": [0, 1, 2]})
    vcs = xr.DataArray(b, dims=("step", "in_i", "in_j"), coords={"step": [0, 1, 2, 3]})
    r = F.fle_residual(dgram, vcs)
    ref = [np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k]) for k in range(3)]
    close(r, ref)


def test_weight_gradient_batched(make, rng):
    dz = rng.standard_normal((len(STEPS), N, 3))
    h = rng.standard_normal((len(STEPS), N, D))
    out = F.weight_gradient(
        make(dz, ("step", "sample", "out"), step=STEPS),
        make(h, ("step", "sample", "in"), step=STEPS),
    )
    assert out.dims == ("step", "out", "in")
    close(out, _outer_sum(dz, h))


def test_nonfinite_input_gives_nan(make, rng):
    h, g, gamma = _data(rng)
    h[1, 7, 2] = np.nan
    g[2, 0, 0] = np.inf
    H = make(h, ("step", "sample", "in"), step=STEPS)
    Gr = make(g, ("step", "sample", "in"), step=STEPS)
    vc = V.virtual_covariance(H, Gr, 0.1).values
    assert np.isnan(vc[1]).all() and np.isnan(vc[2]).all() and np.isfinite(vc[0]).all()


def test_kernels_match_wrappers(rng):
    h, g, gamma = _data(rng)
    hh, gh, gg = V.vc_stats_np(h, g)
    ds = V.vc_stats(
        xr.DataArray(h, dims=("step", "sample", "in")),
        xr.DataArray(g, dims=("step", "sample", "in")),
    )
    close(ds.sum_hh, hh)
    close(
        V.virtual_covariance_np(hh, gh, gg, gamma),
        _outer_sum(h - gamma[:, None, None] * g, h - gamma[:, None, None] * g),
    )
    close(V.accumulate_trapezoid_np([[1.0, 2.0, 4.0]], [0, 1, 3]), [[0.0, 1.5, 7.5]])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_chunking_never_changes_vc(sample_chunk, step_chunk, seed):
    r = np.random.default_rng(seed)
    h = xr.DataArray(r.standard_normal((3, 40, 5)), dims=("step", "sample", "in"))
    g = xr.DataArray(r.standard_normal((3, 40, 5)), dims=("step", "sample", "in"))
    ref = V.virtual_covariance(h, g, 0.1).values
    ch = {"sample": sample_chunk, "step": step_chunk}
    close(V.virtual_covariance(h.chunk(ch), g.chunk(ch), 0.1), ref, rtol=1e-12)
